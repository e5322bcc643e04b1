"""Models in 3D (``spatial_dims=3``): shapes and gradients of every network on ``(B, C, D, H, W)`` volumes, the
3D spectral maps (FF-Parser identity, frequency-aware resampling), shape checks, and that 2D stays what it was
(same parameter names, 2D-shaped tensors, 3D-shaped twins).

Sizes are odd multiples of each network's ``size_multiple`` with three different axes (20x24x28 for a multiple
of 4, 16x16x32 for the BasicUNet segmentor's 16), so an axis mix-up changes a shape.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from diffmis.errors import InputError
from diffmis.models.hidiff import BinaryConv3d
from diffmis.models.layers import (
    FFParser,
    check_spatial_dims,
    check_spatial_size,
    conv_nd,
    resample_rfft_map,
    resize_to,
)
from diffmis.models.medsegdiff_v2 import SSFormer, UncertainSpatialAttention
from diffmis.registry import MODELS, SEGMENTORS
from test_models import backward_check, perturb_zero_parameters

C_IMG = 2
SIZE = (20, 24, 28)  # multiple of 4
SIZE_V2 = (16, 16, 32)  # multiple of 16 (BasicUNet condition segmentor)
UNET = dict(width=8, channel_mult=(1, 1, 2), num_res_blocks=1, attention_levels=(2,), head_channels=8)
SEG_UNET = dict(features=(4, 4, 8, 8, 16, 4))
BBDM_SEG_CHANNELS = [4, 8, 8]
MODEL_SMALL = {
    "conditional_unet": UNET,
    # FF-Parser maps stored at 16^3 / 2^level: the runtime 20x24x28 spectrum is a resampled one
    "medsegdiff": dict(UNET, condition_levels=(0, 1, 2), image_size=16),
    "medsegdiff_v2": dict(UNET, segmentor_params=SEG_UNET, ssformer_heads=2, ssformer_depth=2, image_size=16),
    "bbdm": dict(segmentor_channels=BBDM_SEG_CHANNELS, width=8, channel_mult=(1, 2), heads=2),
    "bbdm_binary": dict(segmentor_channels=BBDM_SEG_CHANNELS, width=8, channel_mult=(1, 2), heads=2, binary=True),
}
MODEL_SIZE = {name: SIZE_V2 if name == "medsegdiff_v2" else SIZE for name in MODEL_SMALL}
SEG_SMALL = {
    "unet": (SEG_UNET, SIZE_V2),
    "attention_unet": (dict(channels=(4, 8, 8)), SIZE),
    "segresnet": (dict(init_filters=8, blocks_down=(1, 1, 1), blocks_up=(1, 1)), SIZE),
}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def build_model(name: str, k: int, spatial_dims: int = 3) -> nn.Module:
    return MODELS.build(name.removesuffix("_binary"), in_channels=C_IMG, num_classes=k, spatial_dims=spatial_dims,
                        **MODEL_SMALL[name])


def model_inputs(model: nn.Module, name: str, k: int, size: tuple[int, ...], gen: torch.Generator):
    image = torch.randn(2, C_IMG, *size, generator=gen)
    x_t = torch.randn(2, k, *size, generator=gen)
    t = torch.tensor([0, 7], dtype=torch.int64)
    if name.startswith("bbdm"):
        prior = torch.rand(2, k, *size, generator=gen)
        feats = [torch.randn(2, c, *(s >> i for s in size), generator=gen) for i, c in enumerate(BBDM_SEG_CHANNELS)]
        return (x_t > 0).float(), t, {"image": image, "prior": prior, "features": feats}
    return x_t, t, model.condition(image)


# ------------------------------------------------------------------------------------------------------
# spatial_dims argument
# ------------------------------------------------------------------------------------------------------


def test_spatial_dims_must_be_2_or_3():
    assert check_spatial_dims(2) == 2 and check_spatial_dims(3) == 3
    assert isinstance(conv_nd(2, 1, 1, 3), nn.Conv2d) and isinstance(conv_nd(3, 1, 1, 3), nn.Conv3d)
    for bad in (1, 4, True):
        with pytest.raises(ValueError, match=r"spatial_dims must be one of \(2, 3\)"):
            check_spatial_dims(bad)
    for name in MODEL_SMALL:
        with pytest.raises(ValueError, match=r"\(2, 3\)"):
            build_model(name, 1, spatial_dims=4)
    for name, (params, _) in SEG_SMALL.items():
        with pytest.raises(ValueError, match=r"\(2, 3\)"):
            SEGMENTORS.build(name, in_channels=C_IMG, num_classes=1, spatial_dims=4, **params)


# ------------------------------------------------------------------------------------------------------
# denoisers and segmentors: shapes and gradients in 3D
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("name", list(MODEL_SMALL))
def test_denoiser_3d_shape_and_gradients(name, k):
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = build_model(name, k)
    assert model.spatial_dims == 3
    size = MODEL_SIZE[name]
    x_t, t, cond = model_inputs(model, name, k, size, gen)
    out = model(x_t, t, cond)
    assert out.shape == (2, k, *size)
    assert torch.isfinite(out).all()
    if k == 1:
        return  # gradients once per network (K = 3), the 3D passes are the slow part of this file
    proj = torch.randn(out.shape, generator=gen)

    def loss_fn() -> torch.Tensor:
        if "anchor_logits" in cond:  # the condition segmentor is trained through condition() (anchor loss stand-in)
            c = model.condition(cond["image"])
            return (model(x_t, t, c) * proj).sum() + c["anchor_logits"].square().mean()
        return (model(x_t, t, cond) * proj).sum()

    backward_check(model, loss_fn, nonzero=False)  # zero-initialised head: some gradients are exactly 0 here
    perturb_zero_parameters(model, gen)
    backward_check(model, loss_fn, nonzero=True)


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("name", list(SEG_SMALL))
def test_segmentor_3d_shape_features_and_gradients(name, k):
    torch.manual_seed(0)
    params, size = SEG_SMALL[name]
    seg = SEGMENTORS.build(name, in_channels=C_IMG, num_classes=k, spatial_dims=3, **params)
    assert seg.spatial_dims == 3
    image = torch.randn(2, C_IMG, *size)
    out = seg(image)
    assert out.logits.shape == (2, k, *size)
    assert [f.shape[1] for f in out.features] == seg.feature_channels
    assert all(f.dim() == 5 for f in out.features) and out.features[0].shape[2:] == size
    for axis in range(2, 5):  # fine -> coarse along every axis
        sizes = [f.shape[axis] for f in out.features]
        assert sizes == sorted(sizes, reverse=True)
    if k == 3:
        proj = torch.randn_like(out.logits)
        backward_check(seg, lambda: (seg(image).logits * proj).sum(), nonzero=True)


def test_v2_default_segmentor_follows_spatial_dims_and_a_mismatch_is_refused():
    model = build_model("medsegdiff_v2", 1)
    assert model.segmentor.spatial_dims == 3 and model.usa.mean_offset.shape == (3, 8)
    seg2d = SEGMENTORS.build("unet", in_channels=C_IMG, num_classes=1, **SEG_UNET)
    with pytest.raises(ValueError, match="2D but the model has spatial_dims=3"):
        MODELS.build("medsegdiff_v2", in_channels=C_IMG, num_classes=1, spatial_dims=3, segmentor=seg2d,
                     **{k: v for k, v in MODEL_SMALL["medsegdiff_v2"].items() if k != "segmentor_params"})
    with pytest.raises(ValueError, match="3D but the model has spatial_dims=2"):
        MODELS.build("medsegdiff_v2", in_channels=C_IMG, num_classes=1,
                     **dict(MODEL_SMALL["medsegdiff_v2"], segmentor_params=dict(SEG_UNET, spatial_dims=3)))


def test_medsegdiff_image_size_per_axis():
    model = MODELS.build("medsegdiff", in_channels=C_IMG, num_classes=1, spatial_dims=3,
                         **dict(MODEL_SMALL["medsegdiff"], image_size=(20, 24, 28)))
    assert [model.ff_parsers[str(i)].base_size for i in range(3)] == [(20, 24, 28), (10, 12, 14), (5, 6, 7)]
    assert model.ff_parsers["2"].weight.shape == (2, 16, 5, 6, 4)
    with pytest.raises(ValueError, match="image_size"):
        MODELS.build("medsegdiff", in_channels=C_IMG, num_classes=1, spatial_dims=3,
                     **dict(MODEL_SMALL["medsegdiff"], image_size=(20, 24)))


# ------------------------------------------------------------------------------------------------------
# 2D is unchanged: same parameter names, 2D tensors; the 3D twin differs only in the kernels' rank
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(MODEL_SMALL))
def test_2d_and_3d_state_dicts_have_the_same_keys(name):
    with torch.device("meta"):
        sd2 = build_model(name, 2, spatial_dims=2).state_dict()
        sd3 = build_model(name, 2, spatial_dims=3).state_dict()
    assert list(sd2) == list(sd3)
    n_conv = 0
    for key, v2 in sd2.items():
        v3 = sd3[key]
        if "ff_parsers" in key or key.endswith(".nbp"):  # spectral maps (..., H0, W0//2+1) gain a depth axis D0 = H0
            assert v3.shape == (*v2.shape[:-2], v2.shape[-2], *v2.shape[-2:]), key
        elif key.endswith("mean_offset"):  # U-SA: one sub-pixel offset row per axis
            assert v2.shape[0] == 2 and v3.shape == (3, v2.shape[1]), key
        elif v2.dim() == 4:  # a 2D convolution kernel (O, I, k, k) has a cubic (O, I, k, k, k) twin
            assert v3.shape == (*v2.shape, v2.shape[-1]), key
            n_conv += 1
        else:
            assert v3.shape == v2.shape, key
    assert n_conv > 0


def test_2d_model_refuses_a_volume_and_3d_model_an_image():
    model2, model3 = build_model("conditional_unet", 1, spatial_dims=2), build_model("conditional_unet", 1)
    t = torch.tensor([0])
    with pytest.raises(InputError, match=r"expected a 4-D input \(B, C, H, W\)"):
        model2(torch.randn(1, 1, *SIZE), t, {"image": torch.randn(1, C_IMG, *SIZE)})
    with pytest.raises(InputError, match=r"expected a 5-D input \(B, C, D, H, W\)"):
        model3(torch.randn(1, 1, 20, 24), t, {"image": torch.randn(1, C_IMG, 20, 24)})


# ------------------------------------------------------------------------------------------------------
# shape checks and resizing
# ------------------------------------------------------------------------------------------------------


def test_check_spatial_size_names_every_axis():
    check_spatial_size(torch.zeros(1, 1, *SIZE), 4, "Net", 3)
    with pytest.raises(InputError, match="Net: input size 20x24x27 is not divisible by 4"):
        check_spatial_size(torch.zeros(1, 1, 20, 24, 27), 4, "Net")
    with pytest.raises(InputError, match="input size 20x26 is not divisible by 4"):
        check_spatial_size(torch.zeros(1, 1, 20, 26), 4, "Net")


def test_resize_to_is_trilinear_in_3d():
    x = torch.randn(1, 2, 5, 6, 7)
    assert resize_to(x, (5, 6, 7)) is x
    out = resize_to(x, (10, 12, 14))
    assert torch.allclose(out, F.interpolate(x, size=(10, 12, 14), mode="trilinear", align_corners=False))


# ------------------------------------------------------------------------------------------------------
# spectral maps in 3D
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(20, 24, 28), (16, 16, 16), (9, 5, 7)])
def test_ff_parser_3d_identity_at_init(size):
    ffp = FFParser(3, base_size=(8, 12, 16))
    assert ffp.spatial_dims == 3 and ffp.weight.shape == (2, 3, 8, 12, 9)
    x = torch.randn(2, 3, *size)
    assert (ffp(x) - x).abs().max() < 1e-5


def test_ff_parser_3d_filters_by_frequency_along_the_right_axis():
    x = torch.randn(1, 1, 6, 8, 10)
    along_w = FFParser(1, base_size=(6, 8, 10))
    along_d = FFParser(1, base_size=(6, 8, 10))
    with torch.no_grad():
        along_w.weight[0, :, :, :, 1:] = 0.0  # keep only f_x = 0: an average along W
        along_d.weight[0, :, 1:] = 0.0  # keep only f_z = 0: an average along D
    assert torch.allclose(along_w(x), x.mean(dim=-1, keepdim=True).expand_as(x), atol=1e-5)
    assert torch.allclose(along_d(x), x.mean(dim=2, keepdim=True).expand_as(x), atol=1e-5)


def test_resample_rfft_map_3d_follows_physical_frequency():
    def analytic(d: int, h: int, w: int) -> torch.Tensor:  # piecewise linear in frequency, kinks on grid lines
        fz = torch.fft.fftfreq(d)[:, None, None]
        fy = torch.fft.fftfreq(h)[None, :, None]
        fx = torch.fft.rfftfreq(w)[None, None, :]
        return (fz.abs() + 2 * fy.abs() + 3 * fx)[None]

    base = analytic(8, 12, 16)
    assert resample_rfft_map(base, (8, 12, 16), (8, 12, 16)) is base
    out = resample_rfft_map(base, (8, 12, 16), (12, 20, 10))
    assert out.shape == (1, 12, 20, 6)
    inside_z = torch.fft.fftfreq(12) <= torch.fft.fftfreq(8).max()  # beyond the base grid: border value
    inside_y = torch.fft.fftfreq(20) <= torch.fft.fftfreq(12).max()
    want = analytic(12, 20, 10)
    assert torch.allclose(out[:, inside_z][:, :, inside_y], want[:, inside_z][:, :, inside_y], atol=1e-5)


def test_resample_rfft_map_constant_stays_constant_and_matches_2d():
    const = torch.full((3, 5, 6, 4), 0.7311)
    for size in [(20, 24, 28), (7, 9, 11), (4, 5, 6)]:
        out = resample_rfft_map(const, (5, 6, 7), size)
        assert out.shape == (3, size[0], size[1], size[2] // 2 + 1)
        assert (out == 0.7311).all()  # exactly
    # a map constant along the depth frequency resamples slice by slice as the 2D map does
    m2 = torch.rand(2, 12, 9, generator=torch.Generator().manual_seed(0))
    m3 = m2[:, None].expand(2, 6, 12, 9).contiguous()
    out2 = resample_rfft_map(m2, (12, 16), (20, 24))
    out3 = resample_rfft_map(m3, (6, 12, 16), (10, 20, 24))
    assert torch.allclose(out3, out2[:, None].expand_as(out3), atol=1e-6)
    assert resample_rfft_map(m2, (12, 16), (12, 16)) is m2


# ------------------------------------------------------------------------------------------------------
# V2 and HiDiff building blocks in 3D
# ------------------------------------------------------------------------------------------------------


def test_usa_3d_kernel_is_a_normalised_separable_gaussian():
    usa = UncertainSpatialAttention(4, 3, kernel_size=5, spatial_dims=3)
    k = usa.kernel()
    assert k.shape == (3, 1, 5, 5, 5)
    assert torch.allclose(k.sum(dim=(2, 3, 4)), torch.ones(3, 1))
    g = torch.exp(-torch.arange(-2.0, 3.0) ** 2 / 2)
    g = g / g.sum()
    assert torch.allclose(k[0, 0], g[:, None, None] * g[None, :, None] * g[None, None, :], atol=1e-6)
    out = usa(torch.randn(2, 3, 6, 8, 10), torch.randn(2, 4, 3, 4, 5))
    assert out.shape == (2, 3, 6, 8, 10)


def test_ssformer_3d_starts_as_identity():
    ssf = SSFormer(8, 4, depth=2, heads=2, base_size=(2, 3, 4))
    assert ssf.blocks[0].nbp.shape == (8, 2, 3, 3)
    h = torch.randn(2, 8, 4, 6, 8)
    assert torch.equal(ssf(h, torch.randn(2, 4, 8, 12, 16)), h)  # zero-initialised output conv


def test_binary_conv3d_uses_scaled_sign_weights_and_clipped_ste():
    conv = BinaryConv3d(2, 3, 3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight[0, 0, 0, 0, 0] = 2.0  # outside the clip range: no gradient
    x = torch.randn(1, 2, 4, 5, 6)
    w_bin = conv.weight.abs().mean(dim=(1, 2, 3, 4), keepdim=True) * torch.sign(conv.weight)
    out = conv(x)
    assert torch.allclose(out, F.conv3d(x, w_bin.detach(), padding=1), atol=1e-6)
    out.sum().backward()
    assert conv.weight.grad[0, 0, 0, 0, 0] == 0 and conv.weight.grad.abs().sum() > 0
