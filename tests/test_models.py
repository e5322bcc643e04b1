"""Models: shapes and gradients of every registered network, FF-Parser identity, V2 reduction, binarisation."""

from __future__ import annotations

import copy
from typing import Callable

import pytest
import torch
from torch import nn

from diffmis.errors import InputError
from diffmis.losses import segmentation_loss_terms
from diffmis.models import ConditionalUNet, MedSegDiffV2
from diffmis.models.hidiff import BinaryConv2d, binary_activation
from diffmis.models.layers import FFParser, resample_rfft_map
from diffmis.models.medsegdiff_v2 import UncertainSpatialAttention
from diffmis.registry import MODELS, SEGMENTORS

SIZES = [(32, 32), (48, 64)]
CLASSES = [1, 3]
C_IMG = 2
UNET = dict(width=8, channel_mult=(1, 2, 2), num_res_blocks=1, attention_levels=(2,), head_channels=8)
SEG_UNET = dict(features=(8, 8, 8, 16, 16, 8))
SEG_SMALL = {
    "unet": SEG_UNET,
    "attention_unet": dict(channels=(8, 8, 16, 16, 16)),
    "segresnet": dict(init_filters=8, blocks_down=(1, 1, 1, 1), blocks_up=(1, 1, 1)),
}
BBDM_SEG_CHANNELS = [8, 8, 16, 16]
MODEL_SMALL = {
    "conditional_unet": UNET,
    "medsegdiff": dict(UNET, condition_levels=(0, 1, 2), image_size=32),
    "medsegdiff_v2": dict(UNET, segmentor_params=SEG_UNET, ssformer_heads=2, image_size=32),
    "bbdm": dict(segmentor_channels=BBDM_SEG_CHANNELS, width=8, channel_mult=(1, 2, 2), heads=2),
    "bbdm_binary": dict(segmentor_channels=BBDM_SEG_CHANNELS, width=8, channel_mult=(1, 2, 2), heads=2,
                        binary=True),
}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def build_model(name: str, k: int) -> nn.Module:
    params = dict(MODEL_SMALL[name])
    return MODELS.build(name.removesuffix("_binary"), in_channels=C_IMG, num_classes=k, **params)


def model_inputs(model: nn.Module, name: str, k: int, size: tuple[int, int], gen: torch.Generator):
    h, w = size
    image = torch.randn(2, C_IMG, h, w, generator=gen)
    x_t = torch.randn(2, k, h, w, generator=gen)
    t = torch.tensor([0, 7], dtype=torch.int64)
    if name.startswith("bbdm"):
        prior = torch.rand(2, k, h, w, generator=gen)
        # segmentor features at their own resolutions (fine -> coarse): the refiner resizes them
        feats = [torch.randn(2, c, h >> i, w >> i, generator=gen) for i, c in enumerate(BBDM_SEG_CHANNELS)]
        cond = {"image": image, "prior": prior, "features": feats}
        x_t = (x_t > 0).float()
    else:
        cond = model.condition(image)
    return x_t, t, cond


def perturb_zero_parameters(model: nn.Module, gen: torch.Generator) -> None:
    """Give zero-initialised tensors (output heads, time shifts) random values so every gradient can be nonzero."""
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))


def backward_check(model: nn.Module, loss_fn: Callable[[], torch.Tensor], *, nonzero: bool) -> None:
    """Every parameter gets a finite gradient from ``loss_fn()`` (a deterministic closure).

    ``nonzero``: a parameter whose gradient is (near) zero must be one the loss does not depend on. Some are zero
    in exact arithmetic, e.g. a bias feeding a BatchNorm (the batch mean removes it), and come out exactly zero
    or tiny by rounding depending on the CPU; for those the math is checked instead of the rounding: moving the
    parameter must change the loss only as its gradient predicts (a detached path would change it anyway).
    """
    model.zero_grad(set_to_none=True)
    loss_fn().backward()
    named = list(model.named_parameters())
    for name, p in named:
        assert p.grad is not None, f"no gradient reaches {name}"
        assert torch.isfinite(p.grad).all(), f"non-finite gradient in {name}"
    if not nonzero:
        return
    scale = torch.stack([p.grad.abs().mean() for _, p in named]).median()
    gen = torch.Generator().manual_seed(123)
    for name, p in named:
        if p.grad.abs().mean() > 1e-3 * scale:
            continue
        delta = 0.1 * (p.detach().abs().mean() + 0.1) * torch.randn(p.shape, generator=gen)
        with torch.no_grad():
            base = float(loss_fn())
            p.add_(delta)
            moved = float(loss_fn())
            p.sub_(delta)
        predicted = float((p.grad * delta).sum())
        assert abs(moved - base - predicted) <= 1e-3 * (abs(base) + 1.0), \
            f"zero gradient in {name}, but the loss depends on it ({base:.6g} -> {moved:.6g})"


# ------------------------------------------------------------------------------------------------------
# registry
# ------------------------------------------------------------------------------------------------------


def test_registry_names():
    assert {"conditional_unet", "medsegdiff", "medsegdiff_v2", "bbdm"} <= set(MODELS.names())
    assert {"unet", "attention_unet", "segresnet"} <= set(SEGMENTORS.names())
    with pytest.raises(TypeError, match="widht"):
        MODELS.build("conditional_unet", in_channels=1, num_classes=1, widht=8)


# ------------------------------------------------------------------------------------------------------
# denoisers: shape and gradients to every parameter
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("k", CLASSES)
@pytest.mark.parametrize("name", list(MODEL_SMALL))
def test_denoiser_shape_and_gradients(name, k, size):
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = build_model(name, k)
    x_t, t, cond = model_inputs(model, name, k, size, gen)
    out = model(x_t, t, cond)
    assert out.shape == (2, k, *size)
    assert torch.isfinite(out).all()

    proj = torch.randn(out.shape, generator=gen)
    target = (torch.rand(out.shape, generator=gen) > 0.5).float()

    def loss_fn() -> torch.Tensor:
        if "anchor_logits" in cond:  # the condition segmentor runs inside condition() and is trained by the anchor loss
            c = model.condition(cond["image"])
            anchor = segmentation_loss_terms(c["anchor_logits"], target)
            return (model(x_t, t, c) * proj).sum() + anchor["dice"] + 10.0 * anchor["ce"]
        return (model(x_t, t, cond) * proj).sum()

    backward_check(model, loss_fn, nonzero=False)
    perturb_zero_parameters(model, gen)
    x_t, t, cond = model_inputs(model, name, k, size, gen)
    backward_check(model, loss_fn, nonzero=True)


def test_learn_sigma_doubles_output_channels():
    model = ConditionalUNet(C_IMG, 3, learn_sigma=True, **UNET)
    out = model(torch.randn(1, 3, 32, 32), torch.tensor([3]), model.condition(torch.randn(1, C_IMG, 32, 32)))
    assert out.shape == (1, 6, 32, 32)


@pytest.mark.parametrize("name", ["conditional_unet", "medsegdiff", "bbdm"])
def test_indivisible_size_raises_input_error(name):
    model = build_model(name, 1)
    x_t, t, cond = model_inputs(model, name, 1, (32, 32), torch.Generator().manual_seed(0))
    with pytest.raises(InputError, match=f"not divisible by {model.size_multiple}"):
        model(x_t[..., :30], t, cond)


def test_medsegdiff_bf16_autocast_and_channels_last():
    gen = torch.Generator().manual_seed(0)
    model = build_model("medsegdiff", 1).eval()
    perturb_zero_parameters(model, gen)
    x_t, t, cond = model_inputs(model, "medsegdiff", 1, (32, 32), gen)
    with torch.no_grad():
        ref = model(x_t, t, cond)
        cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
        out_cl = cl(x_t.to(memory_format=torch.channels_last), t,
                    {"image": cond["image"].to(memory_format=torch.channels_last)})
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out_bf16 = model(x_t, t, cond)
    # same math in another memory layout: only the summation order may differ (a layout bug is O(1))
    assert torch.allclose(out_cl, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
    assert out_bf16.shape == ref.shape and torch.isfinite(out_bf16).all()


def test_medsegdiff_presets_and_ablation_switches():
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        counts = {size: sum(p.numel() for p in MODELS.build("medsegdiff", in_channels=3, num_classes=1,
                                                              size=size).parameters()) for size in "SBL"}
    assert counts["S"] < counts["B"] < counts["L"] and 20e6 < counts["B"] < 30e6
    plain = build_model("medsegdiff", 1)
    ablated = MODELS.build("medsegdiff", in_channels=C_IMG, num_classes=1, dce=False, ff_parser=False,
                           **MODEL_SMALL["medsegdiff"])
    assert len(plain.ff_parsers) == len(plain.dce) == 3 and not ablated.ff_parsers and not ablated.dce
    x_t, t, cond = model_inputs(ablated, "medsegdiff", 1, (32, 32), torch.Generator().manual_seed(0))
    assert ablated(x_t, t, cond).shape == (2, 1, 32, 32)


# ------------------------------------------------------------------------------------------------------
# FF-Parser and spectral resampling
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(64, 64), (96, 96), (256, 256), (48, 80), (33, 17)])
def test_ff_parser_identity_at_init(size):
    ffp = FFParser(3, base_size=(64, 64))
    x = torch.randn(2, 3, *size)
    assert (ffp(x) - x).abs().max() < 1e-5


def test_resample_rfft_map_follows_physical_frequency():
    def analytic(h: int, w: int) -> torch.Tensor:  # piecewise linear in frequency, kink on a grid line
        fy = torch.fft.fftfreq(h)[:, None]
        fx = torch.fft.rfftfreq(w)[None, :]
        return (fy.abs() + 2 * fx)[None]

    base = analytic(64, 64)
    assert resample_rfft_map(base, (64, 64), (64, 64)) is base
    out = resample_rfft_map(base, (64, 64), (96, 80))
    assert out.shape == (1, 96, 41)
    inside = torch.fft.fftfreq(96) <= torch.fft.fftfreq(64).max()  # beyond the base grid: border value
    assert torch.allclose(out[:, inside], analytic(96, 80)[:, inside], atol=1e-5)


def test_ff_parser_filters_by_frequency():
    ffp = FFParser(1, base_size=(32, 24))
    with torch.no_grad():
        ffp.weight[0, :, :, 1:] = 0.0  # real part: keep only f_x = 0, i.e. a row average along W
    x = torch.randn(1, 1, 32, 24)
    assert torch.allclose(ffp(x), x.mean(dim=-1, keepdim=True).expand_as(x), atol=1e-5)


# ------------------------------------------------------------------------------------------------------
# MedSegDiff-V2
# ------------------------------------------------------------------------------------------------------


def test_v2_without_anchor_and_ssformer_equals_conditional_unet():
    torch.manual_seed(0)
    base = ConditionalUNet(C_IMG, 2, **UNET)
    perturb_zero_parameters(base, torch.Generator().manual_seed(1))
    v2 = MedSegDiffV2(C_IMG, 2, anchor=False, ss_former=False, segmentor_params=SEG_UNET, **UNET)
    result = v2.load_state_dict(base.state_dict(), strict=False)
    assert result.unexpected_keys == []
    assert result.missing_keys and all(k.startswith("segmentor.") for k in result.missing_keys)
    gen = torch.Generator().manual_seed(2)
    image, x_t, t = torch.randn(2, C_IMG, 32, 32, generator=gen), torch.randn(2, 2, 32, 32, generator=gen), \
        torch.tensor([1, 9])
    base.eval(), v2.eval()
    with torch.no_grad():
        assert (v2(x_t, t, v2.condition(image)) - base(x_t, t, base.condition(image))).abs().max() < 1e-6


def test_v2_condition_keys_and_given_segmentor():
    seg = SEGMENTORS.build("segresnet", in_channels=C_IMG, num_classes=1, **SEG_SMALL["segresnet"])
    model = MedSegDiffV2(C_IMG, 1, segmentor=seg, ssformer_heads=2, image_size=32, **UNET)
    assert model.segmentor is seg
    cond = model.condition(torch.randn(1, C_IMG, 32, 32))
    assert set(cond) == {"image", "anchor_logits", "anchor_feat", "semantic"}
    assert cond["anchor_logits"].shape == (1, 1, 32, 32)
    assert cond["anchor_feat"].shape == (1, 8, 32, 32) and cond["semantic"].shape == (1, 64, 4, 4)
    with pytest.raises(KeyError, match="condition"):
        model(torch.randn(1, 1, 32, 32), torch.tensor([0]), {"image": cond["image"]})


def test_usa_kernel_is_a_normalised_gaussian():
    usa = UncertainSpatialAttention(4, 3, kernel_size=5)
    k = usa.kernel()
    assert k.shape == (3, 1, 5, 5)
    assert torch.allclose(k.sum(dim=(2, 3)), torch.ones(3, 1))
    g = torch.exp(-torch.arange(-2.0, 3.0) ** 2 / 2)
    assert torch.allclose(k[0, 0], torch.outer(g, g) / g.sum() ** 2, atol=1e-6)


def test_binary_activation_forward_and_piecewise_quadratic_gradient():
    x = torch.tensor([-2.0, -0.5, 0.0, 0.5, 2.0], requires_grad=True)
    y = binary_activation(x)
    y.sum().backward()
    assert y.tolist() == [-1.0, -1.0, 1.0, 1.0, 1.0]
    assert torch.allclose(x.grad, torch.tensor([0.0, 1.0, 2.0, 1.0, 0.0]))


def test_binary_conv_uses_scaled_sign_weights_and_clipped_ste():
    conv = BinaryConv2d(2, 3, 3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight[0, 0, 0, 0] = 2.0  # outside the clip range: no gradient
    x = torch.randn(1, 2, 5, 5)
    w_bin = conv.weight.abs().mean(dim=(1, 2, 3), keepdim=True) * torch.sign(conv.weight)
    out = conv(x)
    assert torch.allclose(out, torch.nn.functional.conv2d(x, w_bin.detach(), padding=1), atol=1e-6)
    out.sum().backward()
    assert conv.weight.grad[0, 0, 0, 0] == 0 and conv.weight.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------------------
# segmentors
# ------------------------------------------------------------------------------------------------------

SEG_HEAD = {"unet": "final_conv", "attention_unet": "model.2", "segresnet": "conv_final"}


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("k", CLASSES)
@pytest.mark.parametrize("name", list(SEG_SMALL))
def test_segmentor_shape_features_and_gradients(name, k, size):
    torch.manual_seed(0)
    seg = SEGMENTORS.build(name, in_channels=C_IMG, num_classes=k, **SEG_SMALL[name])
    out = seg(torch.randn(2, C_IMG, *size))
    assert out.logits.shape == (2, k, *size)
    assert [f.shape[1] for f in out.features] == seg.feature_channels
    assert out.features[0].shape[-2:] == size
    heights = [f.shape[-2] for f in out.features]
    assert heights == sorted(heights, reverse=True)  # fine -> coarse
    # the finest feature is the map the logit head reads: the hooks capture the right tensors
    assert torch.allclose(seg.net.get_submodule(SEG_HEAD[name])(out.features[0]), out.logits, atol=1e-5)
    assert not any(m._forward_hooks for m in seg.modules())  # hooks live for one call only
    probs = seg.probabilities(out.logits)
    assert ((probs >= 0) & (probs <= 1)).all()
    if k > 1:
        assert torch.allclose(probs.sum(dim=1), torch.ones(2, *size), atol=1e-5)
    image, proj = torch.randn(2, C_IMG, *size), torch.randn_like(out.logits)
    backward_check(seg, lambda: (seg(image).logits * proj).sum(), nonzero=True)


def test_segmentor_deepcopy_and_size_check():
    seg = SEGMENTORS.build("unet", in_channels=C_IMG, num_classes=1, **SEG_UNET)
    twin = copy.deepcopy(seg)
    x = torch.randn(1, C_IMG, 32, 32)
    assert torch.allclose(twin(x).features[-1], seg(x).features[-1])
    with pytest.raises(InputError, match="divisible by 16"):
        seg(torch.randn(1, C_IMG, 40, 40))
