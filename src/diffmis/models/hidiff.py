"""HiDiff's BBDM refiner denoiser (Chen et al., arXiv 2407.03548; METHODS 5.4).

The refiner of a Bernoulli diffusion whose stationary law is the segmentor prior ``B(p)``. Input is the channel
concatenation ``[I, y_t, p]``; the output is K **flip logits**: the logit of the probability that each pixel of
``y_t`` is a flipped (XOR-noised) version of ``y_0``. The model applies no sigmoid: the Bernoulli scheduler does
(``eps_hat = sigmoid(logits)``, ``y0_hat = |y_t - eps_hat|``, METHODS 5.3.3).

Trunk: ReActNet/Bi-Real style basic blocks with time-conditioned learnable shifts, real-valued by default;
``binary=True`` binarises the trunk convolutions (sign activations with a piecewise-quadratic straight-through
gradient, scaled sign weights with a clipped straight-through gradient). The stem, head, feature projections
and attention stay full precision. Segmentor features (``cond["features"]``, fine -> coarse, widths
``segmentor_channels``) are resized to the trunk's scale, fused at three levels (projection + concat + block)
and at the bottleneck by a two-way cross-attention. The head is zero-initialised.

Fixed with respect to the released code (METHODS 5.8): the forward returns its output; the feature widths are a
required argument (no empty ``condition_dim_list``); the prior is whatever probability the recipe passes (it
must be a sigmoid for K = 1, never a one-channel softmax). Simplified [INFER]: LayerNorm instead of BatchNorm
over tokens, a GELU MLP instead of the RPReLU/LayerScale/pooling mixer in the attention layer.

Input size: every spatial axis must be divisible by ``2 ** len(channel_mult)`` (:attr:`size_multiple`).
``spatial_dims=3`` builds the volumetric refiner (``(B, C, D, H, W)`` inputs; Conv3d, BatchNorm3d, 3D average
pooling, cross-attention over all voxels of the bottleneck); 2D (the default) is unchanged, parameter names and
shapes included.

Contents
    1. Binarisation (sign activation, scaled sign weights)
    2. Time-shifted basic, down and up blocks
    3. Segmentor-feature fusion (concat layer, two-way cross-attention)
    4. Model
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffmis.models.layers import (
    OutputHead,
    ResBlock,
    TimeEmbedding,
    check_spatial_dims,
    check_spatial_size,
    conv_nd,
    resize_to,
)
from diffmis.registry import MODELS

__all__ = ["BBDMDenoiser", "binary_activation", "BinaryConv2d", "BinaryConv3d", "binary_weight"]


# ======================================================================================================
# 1. Binarisation
# ======================================================================================================


def binary_activation(x: Tensor) -> Tensor:
    """Sign activation with the Bi-Real piecewise-quadratic straight-through gradient.

    Forward: ``sign(x)`` in {-1, +1} (0 maps to +1). Backward: the derivative of
    ``F(x) = 2x - x|x|`` on ``|x| < 1`` and ``±1`` outside, i.e. ``2 - 2|x|`` inside and 0 outside.
    """
    xc = x.clamp(-1.0, 1.0)
    soft = 2 * xc - xc * xc.abs()  # piecewise quadratic approximation of sign
    hard = torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))
    return soft + (hard - soft).detach()


def binary_weight(w: Tensor) -> Tensor:
    """``alpha_o * sign(W)`` with ``alpha_o = mean |W[o]|`` over all dims but the output channel (any conv rank).

    Forward: the scaled sign weights; backward: the gradient reaches ``W`` through ``clip(W, -1, 1)`` (clipped
    straight-through estimator).
    """
    scale = w.abs().mean(dim=tuple(range(1, w.dim())), keepdim=True)
    clipped = w.clamp(-1.0, 1.0)
    return clipped + (scale * torch.sign(w) - clipped).detach()  # forward: alpha*sign(W); backward: clip STE


class BinaryConv2d(nn.Conv2d):
    """2D convolution with weights ``alpha_o * sign(W)``, ``alpha_o = mean |W[o]|`` per output channel.

    The gradient reaches the real weights through ``clip(W, -1, 1)`` (clipped straight-through estimator).
    """

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, binary_weight(self.weight), self.bias, self.stride, self.padding, self.dilation,
                        self.groups)


class BinaryConv3d(nn.Conv3d):
    """3D convolution with weights ``alpha_o * sign(W)`` (:class:`BinaryConv2d` for volumes)."""

    def forward(self, x: Tensor) -> Tensor:
        return F.conv3d(x, binary_weight(self.weight), self.bias, self.stride, self.padding, self.dilation,
                        self.groups)


def _conv_class(spatial_dims: int, binary: bool) -> type[nn.Module]:
    if spatial_dims == 2:
        return BinaryConv2d if binary else nn.Conv2d
    return BinaryConv3d if binary else nn.Conv3d


def _batch_norm(spatial_dims: int, channels: int) -> nn.Module:
    return nn.BatchNorm2d(channels) if spatial_dims == 2 else nn.BatchNorm3d(channels)


# ======================================================================================================
# 2. Time-shifted basic, down and up blocks
# ======================================================================================================


class TimeShift(nn.Module):
    """A learnable per-channel shift that depends on the timestep: ``x + Linear(emb)`` (zero-initialised)."""

    def __init__(self, time_dim: int, channels: int) -> None:
        super().__init__()
        self.linear = nn.Linear(time_dim, channels)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        """``x: (B, C, *spatial)``, ``emb: (B, time_dim)`` -> ``x`` shifted per sample and channel."""
        shift = self.linear(emb)
        return x + shift.reshape(*shift.shape, *([1] * (x.dim() - 2)))


def _match_channels(x: Tensor, channels: int) -> Tensor:
    """Parameter-free residual path: identity, average adjacent channel pairs (halving) or repeat (doubling)."""
    c = x.shape[1]
    if c == channels:
        return x
    if c == 2 * channels:
        return (x[:, 0::2] + x[:, 1::2]) / 2
    return torch.cat([x, x], dim=1)


class BasicBlock(nn.Module):
    """``shift -> [sign] -> conv3x3(x3) [binary] -> BN -> + residual -> shift -> PReLU -> shift``.

    Args:
        in_channels: channels of the input.
        out_channels: channels of the output (equal to, half or twice ``in_channels``).
        time_dim: width of the time embedding.
        binary: binarise activation and weights.
        spatial_dims: 2 (Conv2d, BatchNorm2d) or 3 (Conv3d, BatchNorm3d).
    """

    def __init__(self, in_channels: int, out_channels: int, time_dim: int, binary: bool, *,
                 spatial_dims: int = 2) -> None:
        super().__init__()
        if out_channels not in (in_channels, 2 * in_channels) and in_channels != 2 * out_channels:
            raise ValueError(f"BasicBlock widths must be equal or differ by 2x, got {in_channels}->{out_channels}")
        d = check_spatial_dims(spatial_dims)
        self.binary = binary
        self.shift_in = TimeShift(time_dim, in_channels)
        self.conv = _conv_class(d, binary)(in_channels, out_channels, 3, padding=1, bias=False)
        self.bn = _batch_norm(d, out_channels)
        self.shift_mid = TimeShift(time_dim, out_channels)
        self.act = nn.PReLU(out_channels)
        self.shift_out = TimeShift(time_dim, out_channels)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        """``x: (B, C_in, *spatial)``, ``emb: (B, time_dim)`` -> ``(B, C_out, *spatial)``."""
        h = self.shift_in(x, emb)
        if self.binary:
            h = binary_activation(h)
        h = self.bn(self.conv(h)) + _match_channels(x, self.bn.num_features)
        return self.shift_out(self.act(self.shift_mid(h, emb)), emb)


class DownBlock(nn.Module):
    """Stride-2 block: ``out/in`` (1 or 2) parallel stride-2 convs, concatenated, plus an average-pooled residual."""

    def __init__(self, in_channels: int, out_channels: int, time_dim: int, binary: bool, *,
                 spatial_dims: int = 2) -> None:
        super().__init__()
        if out_channels not in (in_channels, 2 * in_channels):
            raise ValueError(f"DownBlock keeps or doubles the width, got {in_channels}->{out_channels}")
        self.spatial_dims = d = check_spatial_dims(spatial_dims)
        self.binary = binary
        self.copies = out_channels // in_channels
        conv = _conv_class(d, binary)
        self.shift_in = TimeShift(time_dim, in_channels)
        self.convs = nn.ModuleList(conv(in_channels, in_channels, 3, stride=2, padding=1, bias=False)
                                   for _ in range(self.copies))
        self.bns = nn.ModuleList(_batch_norm(d, in_channels) for _ in range(self.copies))
        self.shift_mid = TimeShift(time_dim, out_channels)
        self.act = nn.PReLU(out_channels)
        self.shift_out = TimeShift(time_dim, out_channels)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        """``(B, C_in, *spatial) -> (B, C_out, *spatial / 2)``."""
        h = self.shift_in(x, emb)
        if self.binary:
            h = binary_activation(h)
        h = torch.cat([bn(conv(h)) for conv, bn in zip(self.convs, self.bns)], dim=1)
        pooled = F.avg_pool2d(x, 2) if self.spatial_dims == 2 else F.avg_pool3d(x, 2)
        h = h + torch.cat([pooled] * self.copies, dim=1)
        return self.shift_out(self.act(self.shift_mid(h, emb)), emb)


class UpBlock(nn.Module):
    """Nearest x2 upsampling followed by a :class:`BasicBlock`."""

    def __init__(self, in_channels: int, out_channels: int, time_dim: int, binary: bool, *,
                 spatial_dims: int = 2) -> None:
        super().__init__()
        self.block = BasicBlock(in_channels, out_channels, time_dim, binary, spatial_dims=spatial_dims)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        return self.block(F.interpolate(x, scale_factor=2.0, mode="nearest"), emb)


# ======================================================================================================
# 3. Segmentor-feature fusion
# ======================================================================================================


class ConcatFusion(nn.Module):
    """Resize a segmentor feature to the trunk, project it (full-precision time-FiLM ResBlock), concat, fuse."""

    def __init__(self, feature_channels: int, channels: int, time_dim: int, binary: bool, *,
                 spatial_dims: int = 2) -> None:
        super().__init__()
        self.proj = ResBlock(feature_channels, channels, time_dim, spatial_dims=spatial_dims)
        self.fuse = BasicBlock(2 * channels, channels, time_dim, binary, spatial_dims=spatial_dims)

    def forward(self, h: Tensor, feature: Tensor, emb: Tensor) -> Tensor:
        """``h: (B, C, *spatial)``, ``feature: (B, C_s, *spatial')`` -> ``(B, C, *spatial)``."""
        f = self.proj(resize_to(feature, h.shape[2:]), emb)
        return self.fuse(torch.cat([h, f], dim=1), emb)


class TokenCrossAttention(nn.Module):
    """Pre-norm multi-head cross-attention on token sequences: ``softmax(Q K^T / sqrt(d)) V``."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim={dim} is not divisible by heads={heads}")
        self.heads = heads
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, dim)
        self.to_kv = nn.Linear(dim, 2 * dim)
        self.to_out = nn.Linear(dim, dim)

    def _split(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        return x.reshape(b, n, self.heads, d // self.heads).transpose(1, 2)  # (B, heads, N, D/heads)

    def forward(self, q: Tensor, kv: Tensor) -> Tensor:
        """``q: (B, N, D)``, ``kv: (B, M, D)`` -> ``(B, N, D)`` (no residual)."""
        b, n, d = q.shape
        k, v = self.to_kv(self.norm_kv(kv)).chunk(2, dim=-1)
        out = F.scaled_dot_product_attention(self._split(self.to_q(self.norm_q(q))), self._split(k), self._split(v))
        return self.to_out(out.transpose(1, 2).reshape(b, n, d))


class TwoWayCrossAttention(nn.Module):
    """Bottleneck fusion in two passes (METHODS 5.4).

    Pass 1: queries from the trunk, keys/values from the projected segmentor feature, written residually into
    the segmentor stream (+ MLP). Pass 2: queries from that updated stream, keys/values from the trunk, written
    residually into the trunk (+ MLP), which is reshaped back to the feature map. Tokens are all positions of the
    map (``H*W``, or ``D*H*W`` in 3D).
    """

    def __init__(self, feature_channels: int, channels: int, time_dim: int, heads: int, *,
                 spatial_dims: int = 2) -> None:
        super().__init__()
        self.proj = ResBlock(feature_channels, channels, time_dim, spatial_dims=spatial_dims)
        self.attn_to_feature = TokenCrossAttention(channels, heads)
        self.mlp_feature = nn.Sequential(nn.LayerNorm(channels), nn.Linear(channels, 4 * channels), nn.GELU(),
                                         nn.Linear(4 * channels, channels))
        self.attn_to_trunk = TokenCrossAttention(channels, heads)
        self.mlp_trunk = nn.Sequential(nn.LayerNorm(channels), nn.Linear(channels, 4 * channels), nn.GELU(),
                                       nn.Linear(4 * channels, channels))

    def forward(self, h: Tensor, feature: Tensor, emb: Tensor) -> Tensor:
        """``h: (B, C, *spatial)`` trunk, ``feature: (B, C_s, *spatial')`` -> ``(B, C, *spatial)``."""
        f = self.proj(resize_to(feature, h.shape[2:]), emb)
        trunk = h.flatten(2).transpose(1, 2)  # (B, N, C), N = number of positions
        seg = f.flatten(2).transpose(1, 2)
        seg = seg + self.attn_to_feature(trunk, seg)  # pass 1: trunk queries the feature stream
        seg = seg + self.mlp_feature(seg)
        trunk = trunk + self.attn_to_trunk(seg, trunk)  # pass 2: the feature stream queries the trunk
        trunk = trunk + self.mlp_trunk(trunk)
        return trunk.transpose(1, 2).reshape(h.shape)


# ======================================================================================================
# 4. Model
# ======================================================================================================


@MODELS.register("bbdm")
class BBDMDenoiser(nn.Module):
    """BBDM refiner: ``[I, y_t, p]`` + time + segmentor features -> K flip logits.

    Level ``i`` runs at ``spatial / 2^i`` with ``width * channel_mult[i]`` channels (one basic block, a fusion at
    ``fusion_levels``, then a downsample); the bottleneck at ``H / 2^L`` is block -> two-way cross-attention ->
    block; the decoder upsamples, concatenates the level's skip and fuses it with a basic block. The bottleneck is
    at ``spatial / 2^L``.

    Args:
        in_channels: image channels C.
        num_classes: K mask channels.
        segmentor_channels: widths of the segmentor features, fine -> coarse (``Segmentor.feature_channels``).
        width: trunk width after the stem.
        channel_mult: width multiplier per level; consecutive entries equal or doubling.
        binary: binarised trunk (sign activations and weights) instead of real-valued.
        fusion_levels: trunk levels fused with a segmentor feature; ``None``: the last three levels.
        feature_indices: which segmentor feature goes to each fusion level, then to the bottleneck
            (``len(fusion_levels) + 1`` indices); ``None``: the coarsest ``len(fusion_levels) + 1`` features in
            order (reusing the finest one when the segmentor has fewer).
        heads: attention heads of the bottleneck cross-attention.
        spatial_dims: 2 for ``(B, C, H, W)`` images, 3 for ``(B, C, D, H, W)`` volumes (the segmentor features
            must then be 3D too).
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        segmentor_channels: Sequence[int],
        *,
        width: int = 64,
        channel_mult: Sequence[int] = (1, 1, 2, 2, 4),
        binary: bool = False,
        fusion_levels: Optional[Sequence[int]] = None,
        feature_indices: Optional[Sequence[int]] = None,
        heads: int = 4,
        spatial_dims: int = 2,
    ) -> None:
        super().__init__()
        self.spatial_dims = d = check_spatial_dims(spatial_dims)
        seg = [int(c) for c in segmentor_channels]
        if not seg:
            raise ValueError("segmentor_channels must list the segmentor's feature widths (fine -> coarse)")
        chans = [width * m for m in channel_mult]
        if any(b not in (a, 2 * a) for a, b in zip(chans[:-1], chans[1:])):
            raise ValueError(f"channel_mult entries must stay equal or double, got {tuple(channel_mult)}")
        n_levels = len(chans)
        if fusion_levels is None:
            fusion_levels = range(max(0, n_levels - 3), n_levels)
        self.fusion_levels = tuple(fusion_levels)
        if feature_indices is None:
            n = len(self.fusion_levels) + 1
            feature_indices = [max(0, len(seg) - n + j) for j in range(n)]
        self.feature_indices = tuple(feature_indices)
        if len(self.feature_indices) != len(self.fusion_levels) + 1:
            raise ValueError("feature_indices needs one index per fusion level plus one for the bottleneck")
        if any(not 0 <= i < len(seg) for i in self.feature_indices):
            raise ValueError(f"feature_indices {self.feature_indices} out of range for {len(seg)} features")

        self.in_channels = in_channels
        self.num_classes = num_classes
        self.segmentor_channels = seg
        self.size_multiple = 2**n_levels
        time_dim = 4 * width
        self.time_embed = TimeEmbedding(128, time_dim)
        self.stem = conv_nd(d, in_channels + 2 * num_classes, chans[0], 3, padding=1)
        self.enc_blocks = nn.ModuleList(BasicBlock(c, c, time_dim, binary, spatial_dims=d) for c in chans)
        self.fusions = nn.ModuleDict({
            str(level): ConcatFusion(seg[idx], chans[level], time_dim, binary, spatial_dims=d)
            for level, idx in zip(self.fusion_levels, self.feature_indices)
        })
        self.downs = nn.ModuleList(
            DownBlock(c, chans[i + 1] if i + 1 < n_levels else c, time_dim, binary, spatial_dims=d)
            for i, c in enumerate(chans)
        )
        self.mid_block1 = BasicBlock(chans[-1], chans[-1], time_dim, binary, spatial_dims=d)
        self.mid_attn = TwoWayCrossAttention(seg[self.feature_indices[-1]], chans[-1], time_dim, heads, spatial_dims=d)
        self.mid_block2 = BasicBlock(chans[-1], chans[-1], time_dim, binary, spatial_dims=d)
        ups = [chans[-1]] + chans[::-1][:-1]  # width entering each decoder level, deepest first
        self.ups = nn.ModuleList(UpBlock(a, c, time_dim, binary, spatial_dims=d) for a, c in zip(ups, chans[::-1]))
        self.dec_blocks = nn.ModuleList(BasicBlock(2 * c, c, time_dim, binary, spatial_dims=d) for c in chans[::-1])
        self.head = OutputHead(chans[0], num_classes, spatial_dims=d)  # zero-initialised: fresh model predicts 0

    def forward(self, y_t: Tensor, t: Tensor, cond: dict[str, Tensor | list[Tensor]]) -> Tensor:
        """Predict flip logits.

        Args:
            y_t: ``(B, K, *spatial)`` noisy mask in {0, 1} (``spatial`` is ``H, W`` or ``D, H, W``).
            t: ``(B,)`` int64 timesteps (raw indices).
            cond: ``{"image": (B, C, *spatial), "prior": (B, K, *spatial) probabilities in [0, 1], "features":
                list of segmentor features fine -> coarse with widths segmentor_channels, any resolutions}``.

        Returns:
            ``(B, K, *spatial)`` flip logits (apply a sigmoid for the flip probability).
        """
        check_spatial_size(y_t, self.size_multiple, type(self).__name__, self.spatial_dims)
        features = cond["features"]
        if len(features) != len(self.segmentor_channels):
            raise ValueError(f"expected {len(self.segmentor_channels)} segmentor features, got {len(features)}")
        emb = self.time_embed(t)
        h = self.stem(torch.cat([cond["image"], y_t, cond["prior"]], dim=1))  # [I, y_t, p]
        skips = []
        for i, (block, down) in enumerate(zip(self.enc_blocks, self.downs)):
            h = block(h, emb)
            if str(i) in self.fusions:
                idx = self.feature_indices[self.fusion_levels.index(i)]
                h = self.fusions[str(i)](h, features[idx], emb)
            skips.append(h)
            h = down(h, emb)
        h = self.mid_block1(h, emb)
        h = self.mid_attn(h, features[self.feature_indices[-1]], emb)
        h = self.mid_block2(h, emb)
        for up, block in zip(self.ups, self.dec_blocks):
            h = block(torch.cat([up(h, emb), skips.pop()], dim=1), emb)
        return self.head(h)
