"""MedSegDiff denoiser, paper design (Wu et al., arXiv 2211.00611; METHODS 2.1, 2.7, 2.8 ``fidelity="paper"``).

Two encoders of identical structure: ``E^x`` on the noisy mask ``x_t`` and ``E^I`` on the image ``I``. At the
conditioned levels the mask features pass the FF-Parser and then gate the image features by Dynamic Conditional
Encoding; the two bottleneck embeddings are summed and decoded with skips from the mask path:

    eps_theta(x_t, I, t) = D(E^x_t + E^I_t, t)                       (paper, network overview)
    A(m_I, m_x) = (LN(m_x) ⊙ LN(m_I)) ⊙ m_I                          (paper eq. 3, DCE)
    m_x' = IFFT2(A_ff ⊙ FFT2(m_x))                                   (paper, FF-Parser)

Choices where the paper is silent [INFER, METHODS 2.8]: LN normalises over ``(C, *spatial)`` with a per-channel
affine map (``GroupNorm(1)``); the FF-Parser filters the mask path itself (so the FF-Parser and DCE switches are
independent ablations) and starts as the identity ``1 + 0j``; both encoders take the time embedding (as in the
lucidrains reading); the conditioned levels default to the middle ones.

Input size: every spatial axis must be divisible by ``2 ** (len(channel_mult) - 1)``. Any such size works: the
FF-Parser weights are stored at ``image_size / 2^level`` and resampled to the runtime spectrum. ``spatial_dims=3``
builds the volumetric network (``(B, C, D, H, W)`` inputs, 3D convolutions, FF-Parser on the 3D rfftn); 2D (the
default) is unchanged, parameter names and shapes included.

Contents
    1. Size presets
    2. Dynamic Conditional Encoding
    3. Model
"""

from __future__ import annotations

from typing import Literal, Optional, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from diffmis.models.layers import (
    FFParser,
    LayerNorm2d,
    MiddleBlock,
    OutputHead,
    TimeEmbedding,
    build_decoder,
    build_encoder,
    check_spatial_dims,
    check_spatial_size,
    conv_nd,
    nominal_size,
)
from diffmis.registry import MODELS

__all__ = ["MedSegDiff", "DynamicConditionalEncoding", "SIZE_PRESETS"]


# ======================================================================================================
# 1. Size presets (depth/width); MedSegDiff-B has about 25M parameters at in_channels=3, K=1
# ======================================================================================================

SIZE_PRESETS: dict[str, dict] = {
    "S": {"width": 32, "channel_mult": (1, 1, 2, 3, 4, 4), "num_res_blocks": 1, "attention_levels": (4,)},
    "B": {"width": 48, "channel_mult": (1, 1, 2, 3, 4, 4), "num_res_blocks": 2, "attention_levels": (4,)},
    "L": {"width": 64, "channel_mult": (1, 1, 2, 3, 4, 4), "num_res_blocks": 3, "attention_levels": (3, 4)},
}


# ======================================================================================================
# 2. Dynamic Conditional Encoding
# ======================================================================================================


class DynamicConditionalEncoding(nn.Module):
    """DCE: the current noisy-mask features gate the image features, ``(LN(m_x) ⊙ LN(m_I)) ⊙ m_I``.

    Args:
        channels: feature channels of both maps.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm_mask = LayerNorm2d(channels)
        self.norm_image = LayerNorm2d(channels)

    def forward(self, m_x: Tensor, m_i: Tensor) -> Tensor:
        """``m_x``, ``m_i``: ``(B, C, *spatial)`` mask / image features -> modulated image features, same shape."""
        return self.norm_mask(m_x) * self.norm_image(m_i) * m_i  # eq. 3: (LN(m_x) ⊙ LN(m_I)) ⊙ m_I


# ======================================================================================================
# 3. Model
# ======================================================================================================


@MODELS.register("medsegdiff")
class MedSegDiff(nn.Module):
    """MedSegDiff: mask encoder + image encoder with FF-Parser and DCE, summed bottleneck, one decoder.

    Args:
        in_channels: image channels C.
        num_classes: K mask channels.
        size: preset ``"S"``, ``"B"`` or ``"L"`` (:data:`SIZE_PRESETS`); the arguments below override it.
        width: channels after the stems.
        channel_mult: width multiplier per level.
        num_res_blocks: ResBlocks per encoder level.
        attention_levels: levels with self-attention.
        condition_levels: levels where FF-Parser/DCE act; ``None``: the middle levels ``1 .. L-2`` (all levels
            when there are fewer than 3).
        dce: enable Dynamic Conditional Encoding (ablation switch).
        ff_parser: enable the FF-Parser (ablation switch).
        image_size: nominal input size, one int for every axis or ``spatial_dims`` ints; the FF-Parser weights
            are stored at ``max(1, image_size >> level)`` per axis (any runtime size works).
        head_channels: channels per attention head.
        dropout: dropout inside the ResBlocks.
        learn_sigma: also output K variance channels.
        image_skips: the decoder's skips are the sum of the mask-path and the (DCE-modulated) image-path
            features of each level, not the mask path's alone (the option lucidrains' reading offers, METHODS
            2.7). The paper's design (False) lets the image reach the decoder only through the bottleneck; the
            CPU recipes turn it on (``benchmarks/results/quality_mni_tune.json``: variant ``skips_x0seg_recycle``
            against ``x0seg_recycle``, Dice 0.695 -> 0.892).
        spatial_dims: 2 for ``(B, C, H, W)`` images, 3 for ``(B, C, D, H, W)`` volumes.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        *,
        size: Literal["S", "B", "L"] = "B",
        width: Optional[int] = None,
        channel_mult: Optional[Sequence[int]] = None,
        num_res_blocks: Optional[int] = None,
        attention_levels: Optional[Sequence[int]] = None,
        condition_levels: Optional[Sequence[int]] = None,
        dce: bool = True,
        ff_parser: bool = True,
        image_size: int | Sequence[int] = 256,
        head_channels: int = 64,
        dropout: float = 0.0,
        learn_sigma: bool = False,
        image_skips: bool = False,
        image_head: bool = False,
        spatial_dims: int = 2,
    ) -> None:
        super().__init__()
        self.spatial_dims = d = check_spatial_dims(spatial_dims)
        sizes = nominal_size(image_size, d)
        if size not in SIZE_PRESETS:
            raise ValueError(f"size must be one of {sorted(SIZE_PRESETS)}, got {size!r}")
        preset = SIZE_PRESETS[size]
        width = preset["width"] if width is None else width
        channel_mult = tuple(preset["channel_mult"] if channel_mult is None else channel_mult)
        num_res_blocks = preset["num_res_blocks"] if num_res_blocks is None else num_res_blocks
        attention_levels = tuple(preset["attention_levels"] if attention_levels is None else attention_levels)
        n_levels = len(channel_mult)
        if condition_levels is None:
            condition_levels = range(1, n_levels - 1) if n_levels >= 3 else range(n_levels)
        self.condition_levels = tuple(condition_levels)

        self.in_channels = in_channels
        self.num_classes = num_classes
        self.out_channels = num_classes * (2 if learn_sigma else 1)
        self.size_multiple = 2 ** (n_levels - 1)
        self.image_skips = image_skips
        time_dim = 4 * width
        kw = dict(num_res_blocks=num_res_blocks, attention_levels=attention_levels, head_channels=head_channels,
                  dropout=dropout, spatial_dims=d)

        self.time_embed = TimeEmbedding(width, time_dim)
        self.mask_stem = conv_nd(d, num_classes, width, 3, padding=1)
        self.image_stem = conv_nd(d, in_channels, width, 3, padding=1)
        self.mask_encoder, skips = build_encoder(width, channel_mult, time_dim, **kw)  # E^x
        self.image_encoder, _ = build_encoder(width, channel_mult, time_dim, **kw)  # E^I
        chans = [width * m for m in channel_mult]
        self.ff_parsers = nn.ModuleDict(
            {str(i): FFParser(chans[i], tuple(max(1, s >> i) for s in sizes)) for i in self.condition_levels}
            if ff_parser else {}
        )
        self.dce = nn.ModuleDict(
            {str(i): DynamicConditionalEncoding(chans[i]) for i in self.condition_levels} if dce else {}
        )
        self.middle = MiddleBlock(chans[-1], time_dim, head_channels=head_channels, dropout=dropout, spatial_dims=d)
        self.decoder = build_decoder(width, channel_mult, time_dim, skips, **kw)
        self.head = OutputHead(chans[0], self.out_channels, spatial_dims=d)
        self.image_head = OutputHead(chans[-1], num_classes, spatial_dims=d) if image_head else None

    def condition(self, image: Tensor) -> dict[str, Tensor]:
        """``image: (B, C, *spatial)`` -> ``{"image": image}`` (DCE depends on ``x_t``: nothing else is cacheable)."""
        return {"image": image}

    def forward(self, x_t: Tensor, t: Tensor, cond: dict[str, Tensor], *, image_logits: bool = False
                ) -> Tensor | tuple[Tensor, Tensor]:
        """Predict the diffusion target.

        Args:
            x_t: ``(B, K, *spatial)`` noisy mask (``spatial`` is ``H, W`` or ``D, H, W``).
            t: ``(B,)`` int64 timesteps.
            cond: ``{"image": (B, C, *spatial)}``.
            image_logits: also return the image head's segmentation logits (needs ``image_head=True``).

        Returns:
            ``(B, K * (2 if learn_sigma else 1), *spatial)``; with ``image_logits`` also the ``(B, K, *spatial)``
            logits of the image head (computed at the bottleneck, resized to ``x_t``'s size).
        """
        if image_logits and self.image_head is None:
            raise ValueError("image_logits=True needs a model built with image_head=True")
        check_spatial_size(x_t, self.size_multiple, type(self).__name__, self.spatial_dims)
        emb = self.time_embed(t)
        h_x = self.mask_stem(x_t)
        h_i = self.image_stem(cond["image"])
        both = self.image_skips  # skips from the mask path only (paper), or mask + image path
        skips = [h_x + h_i if both else h_x]
        for i, (level_x, level_i) in enumerate(zip(self.mask_encoder, self.image_encoder)):
            outs = level_x(h_x, emb)
            outs_i = level_i(h_i, emb)
            m_x, m_i = outs[-1], outs_i[-1]
            key = str(i)
            if key in self.ff_parsers:
                m_x = outs[-1] = self.ff_parsers[key](m_x)  # m_x' = IFFT(A ⊙ FFT(m_x))
            if key in self.dce:
                m_i = outs_i[-1] = self.dce[key](m_x, m_i)  # eq. 3
            skips += [a + b for a, b in zip(outs, outs_i)] if both else outs
            h_x, h_i = m_x, m_i
            if level_x.down is not None:
                h_x = level_x.down(h_x)
                h_i = level_i.down(h_i)
                skips.append(h_x + h_i if both else h_x)
        h = self.middle(h_x + h_i, emb)  # D(E^x + E^I): bottleneck sum
        for level in self.decoder:
            h = level(h, skips, emb)
        out = self.head(h)
        if not image_logits:
            return out
        seg = self.image_head(h_i)
        mode = "bilinear" if self.spatial_dims == 2 else "trilinear"
        return out, F.interpolate(seg, size=tuple(x_t.shape[2:]), mode=mode, align_corners=False)
