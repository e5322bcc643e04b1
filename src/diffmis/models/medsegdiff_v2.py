"""MedSegDiff-V2 denoiser, written from the paper (Wu et al., arXiv 2301.11798; METHODS 3.2, 3.3).

The official repository has none of V2's components (METHODS 3.1), so every unknown below is a constructor
argument with the choice of METHODS 3.3 as default [INFER].

* Condition model: any registered segmentor, run once per image by :meth:`MedSegDiffV2.condition`. Its logits
  are the anchor prediction (supervised by the method's anchor loss, ``methods/medsegdiff_v2.py``), its finest
  feature the anchor, its deepest feature the semantic condition. Gradients of the diffusion loss reach it
  (detach in the method if unwanted).
* Anchor condition, U-SA:  ``f_anc = sigmoid((f_c * k_Gauss) + f_c)``, ``f_d' = f_anc ⊙ f_d + f_d`` on the output
  of the first encoder level, with ``f_c = conv1x1(anchor feature)`` and a Gaussian kernel whose width and
  sub-pixel mean are learnable.
* Semantic condition, SS-Former: blocks of cross-attention between the diffusion bottleneck (noise embedding)
  and the projected semantic embedding computed on their rfftn spectra (tokens = frequency bins, real and
  imaginary parts as features), with query roles alternating between blocks; each block's attention output is
  filtered by a learnable neural band-pass (NBP) map before the inverse FFT. A zero-initialised 1x1 conv of both
  streams is added to the bottleneck, so the SS-Former starts as a no-op.
* Diffusion model: :class:`~diffmis.models.conditional_unet.ConditionalUNet` (image concatenated with ``x_t``).
  With ``anchor=False`` and ``ss_former=False`` V2 computes exactly the conditional UNet's function; its
  parameters keep the conditional UNet's names, so a conditional UNet ``state_dict`` loads into it.

Input size: every spatial axis must be divisible by the UNet's and the segmentor's ``size_multiple``.
``spatial_dims=3`` builds the volumetric network: ``(B, C, D, H, W)`` inputs, a 3D condition segmentor, a
separable 3D Gaussian in U-SA and SS-Former attention over the 3D rfftn bins; 2D (the default) is unchanged,
parameter names and shapes included.

Contents
    1. Uncertain spatial attention (U-SA)
    2. SS-Former with the neural band-pass filter
    3. Model
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffmis.models.conditional_unet import ConditionalUNet
from diffmis.models.layers import (
    SPATIAL_DIMS,
    LayerNorm2d,
    check_spatial_dims,
    conv_nd,
    nominal_size,
    resample_rfft_map,
    resize_to,
    rfft_grid_shape,
)
from diffmis.models.segmentors import SegmentorOutput
from diffmis.registry import MODELS, SEGMENTORS

__all__ = ["MedSegDiffV2", "UncertainSpatialAttention", "SpectralCrossAttention", "SSFormer"]


# ======================================================================================================
# 1. Uncertain spatial attention (U-SA)
# ======================================================================================================


class UncertainSpatialAttention(nn.Module):
    """U-SA: a learnable Gaussian blur "relaxes" the anchor before it gates the diffusion features.

    ``a = conv1x1(anchor)``; ``att = sigmoid(G_{sigma, mu} * a + a)``; ``f_d' = att ⊙ f_d + f_d``. The depthwise
    kernel is separable, ``g(k) ∝ exp(-(k - mu)^2 / (2 sigma^2))`` on ``k in {-r..r}`` per axis and channel,
    normalised to sum 1, with learnable ``log sigma`` (init ``log 1``, shared by the axes) and sub-pixel mean
    ``mu`` (init 0, one per axis: ``mean_offset`` has ``spatial_dims`` rows).

    Args:
        anchor_channels: channels of the anchor feature.
        channels: channels ``C_d`` of the diffusion feature it gates.
        kernel_size: odd blur kernel size.
        spatial_dims: 2 (``k x k`` kernel) or 3 (``k x k x k`` kernel, depthwise ``conv3d``).
    """

    def __init__(self, anchor_channels: int, channels: int, kernel_size: int = 5, *, spatial_dims: int = 2) -> None:
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        self.spatial_dims = d = check_spatial_dims(spatial_dims)
        self.radius = kernel_size // 2
        self.proj = conv_nd(d, anchor_channels, channels, 1)
        self.log_sigma = nn.Parameter(torch.full((channels,), math.log(1.0)))
        self.mean_offset = nn.Parameter(torch.zeros(d, channels))  # (dy, dx) or (dz, dy, dx) in pixels

    def kernel(self) -> Tensor:
        """The depthwise Gaussian kernel, ``(C_d, 1, k, k)`` in 2D or ``(C_d, 1, k, k, k)`` in 3D."""
        pos = torch.arange(-self.radius, self.radius + 1, device=self.log_sigma.device, dtype=torch.float32)
        var = torch.exp(2 * self.log_sigma)[:, None]
        # one normalised 1D Gaussian per axis (softmax = exp / sum), each (C_d, k)
        g = [torch.softmax(-((pos - mu[:, None]) ** 2) / (2 * var), dim=-1) for mu in self.mean_offset]
        if self.spatial_dims == 2:
            return (g[0][:, :, None] * g[1][:, None, :])[:, None]
        return (g[0][:, :, None, None] * g[1][:, None, :, None] * g[2][:, None, None, :])[:, None]

    def forward(self, f_d: Tensor, anchor: Tensor) -> Tensor:
        """``f_d: (B, C_d, *spatial)``, ``anchor: (B, C_a, *spatial')`` (resized to ``spatial``) -> like ``f_d``."""
        a = resize_to(self.proj(anchor), f_d.shape[2:])
        r = self.radius
        conv = F.conv2d if self.spatial_dims == 2 else F.conv3d
        blurred = conv(F.pad(a, (r, r) * self.spatial_dims, mode="replicate"), self.kernel().to(a.dtype),
                       groups=a.shape[1])
        att = torch.sigmoid(blurred + a)  # f_anc = sigmoid((f_c * k_Gauss) + f_c)
        return att * f_d + f_d  # f_d' = f_anc ⊙ f_d + f_d


# ======================================================================================================
# 2. SS-Former with the neural band-pass filter
# ======================================================================================================


class SpectralCrossAttention(nn.Module):
    """One SS-Former block: cross-attention between the rfftn spectra of two feature maps (2 or 3 spatial axes).

    ``Q = rfftn(LN(x_q))``, ``K = V = rfftn(LN(x_kv))`` as tokens over the frequency bins (``H x (W//2+1)``, or
    ``D x H x (W//2+1)`` in 3D) with ``2C`` features (real, imaginary); ``O = NBP ⊙ Attn(Q, K, V)``;
    ``x_q <- x_q + irfftn(O)``, then ``x_q <- x_q + MLP(LN(x_q))``. The NBP map (real, per channel and bin,
    init 1) is stored on the rfftn grid of ``base_size`` and resampled by frequency to the runtime spectrum.

    Args:
        channels: channels C of both maps.
        heads: attention heads (must divide ``2C``).
        base_size: ``(H0, W0)`` or ``(D0, H0, W0)`` on which the NBP map is stored; its length is the number of
            spatial axes of the maps.
    """

    def __init__(self, channels: int, heads: int, base_size: Sequence[int]) -> None:
        super().__init__()
        dim = 2 * channels
        if dim % heads:
            raise ValueError(f"2*channels={dim} is not divisible by heads={heads}")
        if len(base_size) not in SPATIAL_DIMS:
            raise ValueError(f"base_size must list 2 or 3 sizes, got {tuple(base_size)}")
        self.heads = heads
        self.base_size = tuple(int(s) for s in base_size)
        self.spatial_dims = d = len(self.base_size)
        self.norm_q = LayerNorm2d(channels)
        self.norm_kv = LayerNorm2d(channels)
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.to_out = nn.Linear(dim, dim)
        self.nbp = nn.Parameter(torch.ones(channels, *rfft_grid_shape(self.base_size)))
        self.mlp = nn.Sequential(LayerNorm2d(channels), conv_nd(d, channels, 4 * channels, 1), nn.GELU(),
                                 conv_nd(d, 4 * channels, channels, 1))

    def _tokens(self, x: Tensor) -> Tensor:
        """``(B, C, *spatial)`` real -> ``(B, N, 2C)`` spectrum tokens, N the rfftn bins (float32 FFT)."""
        spec = torch.fft.rfftn(x.float(), dim=tuple(range(-self.spatial_dims, 0)), norm="ortho")
        return torch.cat([spec.real, spec.imag], dim=1).flatten(2).transpose(1, 2)

    def _split(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        return x.reshape(b, n, self.heads, d // self.heads).transpose(1, 2)

    def forward(self, x_q: Tensor, x_kv: Tensor) -> Tensor:
        """``x_q``, ``x_kv``: ``(B, C, *spatial)`` (same size) -> updated query stream ``(B, C, *spatial)``."""
        b, c = x_q.shape[:2]
        spatial = tuple(x_q.shape[2:])
        if len(spatial) != self.spatial_dims:
            raise ValueError(f"SpectralCrossAttention for {self.spatial_dims}D maps got shape {tuple(x_q.shape)}")
        bins = rfft_grid_shape(spatial)
        with torch.autocast(device_type=x_q.device.type, enabled=False):
            tq = self._tokens(self.norm_q(x_q.float()))  # float32 norms (a GPU refuses bf16 in, fp32 weights)
            tkv = self._tokens(self.norm_kv(x_kv.float()))
        q, k, v = self._split(self.to_q(tq)), self._split(self.to_k(tkv)), self._split(self.to_v(tkv))
        att = F.scaled_dot_product_attention(q, k, v)  # softmax(Q K^T / sqrt(d)) V over frequency bins
        out = self.to_out(att.transpose(1, 2).reshape(b, tq.shape[1], 2 * c))
        with torch.autocast(device_type=x_q.device.type, enabled=False):
            out = out.float().transpose(1, 2).reshape(b, 2, c, *bins)
            nbp = resample_rfft_map(self.nbp.float(), self.base_size, spatial)
            spec = torch.complex(out[:, 0], out[:, 1]) * nbp  # NBP-Filter on the attention output
            dims = tuple(range(-self.spatial_dims, 0))
            x = x_q + torch.fft.irfftn(spec, s=spatial, dim=dims, norm="ortho").to(x_q.dtype)
        return x + self.mlp(x)


class SSFormer(nn.Module):
    """Spectrum-space Transformer: ``depth`` :class:`SpectralCrossAttention` blocks with alternating queries.

    Even blocks update the noise stream (queries from the diffusion bottleneck, keys/values from the semantic
    stream); odd blocks update the semantic stream from the noise stream. The result
    ``conv1x1([noise; semantic])`` (zero-initialised) is added to the bottleneck.

    Args:
        channels: bottleneck channels C.
        semantic_channels: channels of the semantic embedding (projected to C and resized to the bottleneck).
        depth: number of blocks.
        heads: attention heads per block.
        base_size: bottleneck size at the nominal image size (for the NBP maps): 2 sizes for 2D maps, 3 for 3D.
    """

    def __init__(self, channels: int, semantic_channels: int, *, depth: int, heads: int,
                 base_size: Sequence[int]) -> None:
        super().__init__()
        if len(base_size) not in SPATIAL_DIMS:
            raise ValueError(f"base_size must list 2 or 3 sizes, got {tuple(base_size)}")
        self.spatial_dims = d = len(base_size)
        self.semantic_proj = conv_nd(d, semantic_channels, channels, 1)
        self.blocks = nn.ModuleList(SpectralCrossAttention(channels, heads, base_size) for _ in range(depth))
        self.out = conv_nd(d, 2 * channels, channels, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, h: Tensor, semantic: Tensor) -> Tensor:
        """``h: (B, C, *spatial)`` bottleneck, ``semantic: (B, C_s, *spatial')`` -> conditioned, like ``h``."""
        noise_stream = h
        semantic_stream = resize_to(self.semantic_proj(semantic), h.shape[2:])
        for i, block in enumerate(self.blocks):
            if i % 2 == 0:
                noise_stream = block(noise_stream, semantic_stream)  # noise queries semantics
            else:
                semantic_stream = block(semantic_stream, noise_stream)  # semantics query noise
        return h + self.out(torch.cat([noise_stream, semantic_stream], dim=1))


# ======================================================================================================
# 3. Model
# ======================================================================================================


@MODELS.register("medsegdiff_v2")
class MedSegDiffV2(ConditionalUNet):
    """MedSegDiff-V2: the conditional UNet plus a condition segmentor, U-SA (anchor) and SS-Former (semantic).

    Args:
        in_channels: image channels C.
        num_classes: K mask channels.
        segmentor: a built segmentor (``forward(image) -> SegmentorOutput``, attribute ``feature_channels``) for
            ``spatial_dims``-D images; ``None``: build ``segmentor_name`` from the SEGMENTORS registry with
            ``segmentor_params``.
        segmentor_name: registry name used when ``segmentor`` is None.
        segmentor_params: keyword arguments of that segmentor (``spatial_dims`` is added when absent).
        anchor: enable the anchor condition (U-SA).
        ss_former: enable the semantic condition (SS-Former).
        usa_level: encoder level whose output U-SA gates.
        usa_kernel: odd Gaussian kernel size of U-SA.
        ssformer_depth: SS-Former blocks.
        ssformer_heads: attention heads per SS-Former block.
        image_size: nominal input size, one int for every axis or ``spatial_dims`` ints (the NBP maps are stored
            at the bottleneck size of this input).
        width, channel_mult, num_res_blocks, attention_levels, head_channels, dropout, learn_sigma: the
            diffusion UNet, as in :class:`~diffmis.models.conditional_unet.ConditionalUNet`.
        spatial_dims: 2 for ``(B, C, H, W)`` images, 3 for ``(B, C, D, H, W)`` volumes (the UNet, U-SA,
            SS-Former and the default condition segmentor alike).
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        *,
        segmentor: Optional[nn.Module] = None,
        segmentor_name: str = "unet",
        segmentor_params: Optional[dict[str, Any]] = None,
        anchor: bool = True,
        ss_former: bool = True,
        usa_level: int = 0,
        usa_kernel: int = 5,
        ssformer_depth: int = 2,
        ssformer_heads: int = 4,
        image_size: int | Sequence[int] = 256,
        width: int = 48,
        channel_mult: Sequence[int] = (1, 1, 2, 3, 4, 4),
        num_res_blocks: int = 2,
        attention_levels: Sequence[int] = (4,),
        head_channels: int = 64,
        dropout: float = 0.0,
        learn_sigma: bool = False,
        spatial_dims: int = 2,
    ) -> None:
        super().__init__(in_channels, num_classes, width=width, channel_mult=channel_mult,
                         num_res_blocks=num_res_blocks, attention_levels=attention_levels,
                         head_channels=head_channels, dropout=dropout, learn_sigma=learn_sigma,
                         spatial_dims=spatial_dims)
        d = self.spatial_dims
        sizes = nominal_size(image_size, d)
        if segmentor is None:
            params = {"spatial_dims": d, **(segmentor_params or {})}
            segmentor = SEGMENTORS.build(segmentor_name, in_channels=in_channels, num_classes=num_classes, **params)
        if not hasattr(segmentor, "feature_channels"):
            raise TypeError("segmentor must expose feature_channels (a registered SEGMENTORS model)")
        seg_dims = getattr(segmentor, "spatial_dims", None)
        if seg_dims is not None and seg_dims != d:
            raise ValueError(f"the condition segmentor is {seg_dims}D but the model has spatial_dims={d}")
        if getattr(segmentor, "num_classes", num_classes) != num_classes:
            raise ValueError(f"segmentor predicts {segmentor.num_classes} classes, the model {num_classes}")
        if not 0 <= usa_level < len(channel_mult):
            raise ValueError(f"usa_level={usa_level} is not a level index in [0, {len(channel_mult)})")
        self.segmentor = segmentor
        self.size_multiple = max(self.size_multiple, getattr(segmentor, "size_multiple", 1))
        chans = [width * m for m in channel_mult]
        self.usa_level = usa_level
        self.usa = UncertainSpatialAttention(segmentor.feature_channels[0], chans[usa_level], usa_kernel,
                                             spatial_dims=d) if anchor else None
        bottleneck = tuple(max(1, s >> (len(channel_mult) - 1)) for s in sizes)
        self.ss_former = SSFormer(chans[-1], segmentor.feature_channels[-1], depth=ssformer_depth,
                                  heads=ssformer_heads, base_size=bottleneck) if ss_former else None

    def condition(self, image: Tensor) -> dict[str, Tensor]:
        """Run the condition segmentor once per image (the result is reused at every sampling step).

        Args:
            image: ``(B, C, *spatial)`` float32 (``spatial`` is ``H, W`` or ``D, H, W``).

        Returns:
            ``{"image": (B, C, *spatial), "anchor_logits": (B, K, *spatial), "anchor_feat": finest segmentor
            feature (B, C_0, *spatial), "semantic": deepest segmentor feature (B, C_L, *spatial_L)}``.
        """
        out: SegmentorOutput = self.segmentor(image)
        return {"image": image, "anchor_logits": out.logits, "anchor_feat": out.features[0],
                "semantic": out.features[-1]}

    def _modulate_level(self, level: int, h: Tensor, cond: dict[str, Tensor]) -> Tensor:
        if self.usa is None or level != self.usa_level:
            return h
        return self.usa(h, _require(cond, "anchor_feat"))  # f_d' = f_anc ⊙ f_d + f_d

    def _modulate_bottleneck(self, h: Tensor, cond: dict[str, Tensor]) -> Tensor:
        if self.ss_former is None:
            return h
        return self.ss_former(h, _require(cond, "semantic"))


def _require(cond: dict[str, Tensor], key: str) -> Tensor:
    if key not in cond:
        raise KeyError(f"cond has no '{key}'; build it with MedSegDiffV2.condition(image)")
    return cond[key]
