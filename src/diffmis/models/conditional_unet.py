"""Conditional UNet denoiser: the Wolleb et al. / SegDiff baseline (METHODS 1.3, 6.1).

The clean image is concatenated with the noisy mask, ``[I, x_t]``, and a time-conditioned ResBlock UNet
predicts the noise target (eps / x0 / v, whichever the scheduler trains) for the K mask channels, plus K
variance channels when ``learn_sigma``. This is the common template of the diffusion denoisers and the
"no DCE, no FF-Parser" ablation point; MedSegDiff-V2 subclasses it and hooks into :meth:`_modulate_level` and
:meth:`_modulate_bottleneck`.

Input size: every spatial axis must be divisible by ``2 ** (len(channel_mult) - 1)`` (:attr:`size_multiple`).
``spatial_dims=3`` makes the same network volumetric: inputs ``(B, C, D, H, W)``, 3D convolutions, self-attention
over all voxels of a level; 2D (the default) is unchanged, parameter names and shapes included.

Contents
    1. Model
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from diffmis.models.layers import (
    MiddleBlock,
    OutputHead,
    TimeEmbedding,
    build_decoder,
    build_encoder,
    check_spatial_dims,
    check_spatial_size,
    conv_nd,
)
from diffmis.registry import MODELS

__all__ = ["ConditionalUNet"]


# ======================================================================================================
# 1. Model
# ======================================================================================================


@MODELS.register("conditional_unet")
class ConditionalUNet(nn.Module):
    """Image-concatenation conditional UNet: ``eps_theta([I, x_t], t)``.

    Level ``i`` runs at ``spatial / 2^i`` with ``width * channel_mult[i]`` channels and ``num_res_blocks`` ResBlocks
    (with self-attention at ``attention_levels``); the bottleneck is ResBlock-attention-ResBlock; the decoder
    mirrors the encoder with a skip concatenated into each block (guided-diffusion layout).

    Args:
        in_channels: image channels C.
        num_classes: K mask channels (the noisy mask ``x_t`` has K channels).
        width: channels after the stem (the defaults match MedSegDiff-B's UNet, about 19M parameters).
        channel_mult: width multiplier per level; its length fixes the number of levels.
        num_res_blocks: ResBlocks per encoder level (the decoder has one more).
        attention_levels: indices of the levels with self-attention (e.g. level 4 is 16x16 at 256x256 input).
        head_channels: channels per attention head.
        dropout: dropout inside the ResBlocks.
        learn_sigma: also output K variance channels (improved-DDPM learned range).
        spatial_dims: 2 for ``(B, C, H, W)`` images, 3 for ``(B, C, D, H, W)`` volumes.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        *,
        width: int = 48,
        channel_mult: Sequence[int] = (1, 1, 2, 3, 4, 4),
        num_res_blocks: int = 2,
        attention_levels: Sequence[int] = (4,),
        head_channels: int = 64,
        dropout: float = 0.0,
        learn_sigma: bool = False,
        spatial_dims: int = 2,
    ) -> None:
        super().__init__()
        self.spatial_dims = d = check_spatial_dims(spatial_dims)
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.out_channels = num_classes * (2 if learn_sigma else 1)
        self.size_multiple = 2 ** (len(channel_mult) - 1)
        time_dim = 4 * width
        attention_levels = tuple(attention_levels)
        self.time_embed = TimeEmbedding(width, time_dim)
        self.stem = conv_nd(d, in_channels + num_classes, width, 3, padding=1)
        self.encoder, skips = build_encoder(width, channel_mult, time_dim, num_res_blocks=num_res_blocks,
                                            attention_levels=attention_levels, head_channels=head_channels,
                                            dropout=dropout, spatial_dims=d)
        self.middle = MiddleBlock(width * channel_mult[-1], time_dim, head_channels=head_channels, dropout=dropout,
                                  spatial_dims=d)
        self.decoder = build_decoder(width, channel_mult, time_dim, skips, num_res_blocks=num_res_blocks,
                                     attention_levels=attention_levels, head_channels=head_channels, dropout=dropout,
                                     spatial_dims=d)
        self.head = OutputHead(width * channel_mult[0], self.out_channels, spatial_dims=d)

    def condition(self, image: Tensor) -> dict[str, Tensor]:
        """The per-image condition, computed once and reused at every sampling step.

        Args:
            image: ``(B, C, *spatial)`` float32.

        Returns:
            ``{"image": image}``.
        """
        return {"image": image}

    def forward(self, x_t: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        """Predict the diffusion target.

        Args:
            x_t: ``(B, K, *spatial)`` noisy mask (``spatial`` is ``H, W`` or ``D, H, W``).
            t: ``(B,)`` int64 timesteps.
            cond: :meth:`condition` output (``cond["image"]``: ``(B, C, *spatial)``).

        Returns:
            ``(B, K * (2 if learn_sigma else 1), *spatial)``: the prediction, then the variance channels.
        """
        check_spatial_size(x_t, self.size_multiple, type(self).__name__, self.spatial_dims)
        emb = self.time_embed(t)
        h = self.stem(torch.cat([cond["image"], x_t], dim=1))  # conditioning by concatenation [I, x_t]
        skips = [h]
        for i, level in enumerate(self.encoder):
            outs = level(h, emb)
            outs[-1] = self._modulate_level(i, outs[-1], cond)
            skips += outs
            h = outs[-1]
            if level.down is not None:
                h = level.down(h)
                skips.append(h)
        h = self._modulate_bottleneck(self.middle(h, emb), cond)
        for level in self.decoder:
            h = level(h, skips, emb)
        return self.head(h)

    def _modulate_level(self, level: int, h: Tensor, cond: dict[str, Tensor]) -> Tensor:
        """Hook on the last block output of encoder ``level`` (before its skip and downsample); identity here."""
        return h

    def _modulate_bottleneck(self, h: Tensor, cond: dict[str, Tensor]) -> Tensor:
        """Hook on the bottleneck output (before the decoder); identity here."""
        return h
