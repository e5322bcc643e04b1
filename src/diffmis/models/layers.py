"""Building blocks shared by the denoisers: time embedding, ResBlock, attention, resampling, spectral filters.

Every block here works on ``(B, C, *spatial)`` feature maps of any spatial size (the spectral filters are sized
from the runtime feature shape): ``(B, C, H, W)`` with ``spatial_dims=2`` (the default) or ``(B, C, D, H, W)`` with
``spatial_dims=3``, where every convolution, pooling and interpolation is its 3D counterpart. The 2D modules, their
parameter names and shapes are those of the 2D-only code, so existing checkpoints load unchanged. The blocks are
channels-last friendly (convolutions, GroupNorm, interpolation and FFTs only; no per-pixel Python) and never see a
noise schedule: a timestep enters only through its embedding.

Contents
    1. Shape checks and small helpers
    2. Timestep embedding (sinusoidal + MLP)
    3. ResBlock with time FiLM, self-attention, down/upsampling
    4. Guided-diffusion style UNet encoder/decoder levels (shared by the conditional UNet and MedSegDiff)
    5. Spectral maps on the rfftn grid (2 or 3 axes): frequency-aware resampling, FF-Parser
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffmis.errors import InputError

__all__ = [
    "SPATIAL_DIMS",
    "check_spatial_dims",
    "conv_nd",
    "nominal_size",
    "check_spatial_size",
    "resize_to",
    "group_norm",
    "GroupNorm",
    "LayerNorm2d",
    "timestep_embedding",
    "TimeEmbedding",
    "ResBlock",
    "SelfAttention2d",
    "SelfAttention",
    "Downsample",
    "Upsample",
    "ResAttnBlock",
    "EncoderLevel",
    "DecoderLevel",
    "MiddleBlock",
    "OutputHead",
    "build_encoder",
    "build_decoder",
    "rfft_grid_shape",
    "resample_rfft_map",
    "FFParser",
]


# ======================================================================================================
# 1. Shape checks and small helpers
# ======================================================================================================


SPATIAL_DIMS = (2, 3)  # the supported numbers of spatial axes: (B, C, H, W) and (B, C, D, H, W)


def check_spatial_dims(spatial_dims: int) -> int:
    """Return ``spatial_dims`` if it is 2 or 3 (:data:`SPATIAL_DIMS`), else raise :class:`ValueError`."""
    if isinstance(spatial_dims, bool) or spatial_dims not in SPATIAL_DIMS:
        raise ValueError(f"spatial_dims must be one of {SPATIAL_DIMS} (2D or 3D images), got {spatial_dims!r}")
    return int(spatial_dims)


def conv_nd(spatial_dims: int, *args, **kwargs) -> nn.Module:
    """``nn.Conv2d(*args, **kwargs)`` for ``spatial_dims=2``, ``nn.Conv3d(*args, **kwargs)`` for 3."""
    return (nn.Conv2d if check_spatial_dims(spatial_dims) == 2 else nn.Conv3d)(*args, **kwargs)


def nominal_size(image_size: int | Sequence[int], spatial_dims: int) -> tuple[int, ...]:
    """``image_size`` (one int for every axis, or ``spatial_dims`` ints) as a tuple of ``spatial_dims`` ints."""
    if isinstance(image_size, numbers.Integral):
        return (int(image_size),) * spatial_dims
    sizes = tuple(int(s) for s in image_size)
    if len(sizes) != spatial_dims:
        raise ValueError(f"image_size must be an int or {spatial_dims} ints (spatial_dims={spatial_dims}), "
                         f"got {sizes}")
    return sizes


def check_spatial_size(x: Tensor, multiple: int, who: str, spatial_dims: int | None = None) -> None:
    """Raise :class:`InputError` unless every spatial axis of ``x`` is divisible by ``multiple``.

    Args:
        x: ``(B, C, *spatial)`` input of a network with ``log2(multiple)`` stride-2 downsamplings.
        multiple: required divisor of every spatial axis (``2 ** downsamplings``).
        who: name of the network, used in the message.
        spatial_dims: when given, ``x`` must also have exactly this many spatial axes (``x.dim() == 2 + d``).
    """
    if spatial_dims is not None and x.dim() != spatial_dims + 2:
        layout = "(B, C, H, W)" if spatial_dims == 2 else "(B, C, D, H, W)"
        raise InputError(
            f"{who}: expected a {spatial_dims + 2}-D input {layout} (the network is {spatial_dims}D), "
            f"got shape {tuple(x.shape)}"
        )
    spatial = tuple(x.shape[2:])
    if any(s % multiple for s in spatial):
        raise InputError(
            f"{who}: input size {'x'.join(str(s) for s in spatial)} is not divisible by {multiple} (the network "
            f"downsamples {int(math.log2(multiple))} times); resize or pad the image to a multiple of {multiple}"
        )


def resize_to(x: Tensor, size: Sequence[int]) -> Tensor:
    """Resize ``x: (B, C, *spatial)`` to ``size`` (bilinear in 2D, trilinear in 3D); ``x`` itself if sizes match."""
    if tuple(x.shape[2:]) == tuple(size):
        return x
    mode = "bilinear" if x.dim() == 4 else "trilinear"
    return F.interpolate(x, size=tuple(size), mode=mode, align_corners=False)


def _trailing(t: Tensor, like: Tensor) -> Tensor:
    """``t: (B, C)`` viewed as ``(B, C, 1, ..., 1)`` to broadcast over the spatial axes of ``like``."""
    return t.reshape(*t.shape, *([1] * (like.dim() - 2)))


class _GroupNormNCHW(torch.autograd.Function):
    """``F.group_norm`` of a channels-last map computed on its NCHW copy, forward and backward.

    The CPU GroupNorm backward kernel is far slower on channels-last tensors than on contiguous ones (about 30x
    in bfloat16, 4x in float32 at ``(8, 32, 128, 128)``), so a channels-last input, the saved input and the
    incoming gradient are made contiguous around the ATen kernels; the output and the input gradient are handed
    back channels-last. Same kernels, same math: only the memory layout differs.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight, bias, groups: int, eps: float) -> Tensor:
        n, c = x.shape[:2]
        hw = x.numel() // max(1, n * c)
        xc = x.contiguous()
        y, mean, rstd = torch.ops.aten.native_group_norm(xc, weight, bias, n, c, hw, groups, eps)
        ctx.save_for_backward(xc, weight, mean, rstd)
        ctx.shape = (n, c, hw, groups)
        return y.contiguous(memory_format=torch.channels_last)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        xc, weight, mean, rstd = ctx.saved_tensors
        n, c, hw, groups = ctx.shape
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        gx, gw, gb = torch.ops.aten.native_group_norm_backward(
            grad_out.contiguous(), xc, mean, rstd, weight, n, c, hw, groups,
            [need_x, need_w and weight is not None, need_b and weight is not None],
        )
        if gx is not None:
            gx = gx.contiguous(memory_format=torch.channels_last)
        return gx, gw, gb, None, None


class GroupNorm(nn.GroupNorm):
    """:class:`torch.nn.GroupNorm` (same parameters and result) with a fast path for channels-last 4-D inputs.

    A channels-last input is normalised on an NCHW copy (:class:`_GroupNormNCHW`): the CPU GroupNorm backward
    is many times slower in channels-last. Double backward is not supported on that path. 5-D (3D) inputs always
    take plain ``F.group_norm``.
    """

    def forward(self, x: Tensor) -> Tensor:
        if (
            x.dim() == 4
            and x.device.type == "cpu"
            and not x.is_contiguous()
            and x.is_contiguous(memory_format=torch.channels_last)
        ):
            return _GroupNormNCHW.apply(x, self.weight, self.bias, self.num_groups, self.eps)
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


def group_norm(channels: int, max_groups: int = 32) -> nn.GroupNorm:
    """GroupNorm with the largest group count ``<= max_groups`` that divides ``channels`` (works for tiny widths)."""
    groups = max(g for g in range(1, min(max_groups, channels) + 1) if channels % g == 0)
    return GroupNorm(groups, channels)


class LayerNorm2d(GroupNorm):
    """Layer norm over ``(C, *spatial)`` of each sample with a per-channel affine map (= ``GroupNorm(1, C)``).

    Despite the name it normalises 2D and 3D maps alike (the name is kept for the checkpoints' module types).
    """

    def __init__(self, channels: int) -> None:
        super().__init__(1, channels)


# ======================================================================================================
# 2. Timestep embedding
# ======================================================================================================


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of integer timesteps (Vaswani et al. positional encoding, as in DDPM).

    ``emb[:, i] = cos(t * w_i)``, ``emb[:, half + i] = sin(t * w_i)`` with ``w_i = max_period^(-i / half)``.

    Args:
        t: ``(B,)`` int64 (or float) timesteps, 0-indexed.
        dim: embedding width; an odd width is zero-padded by one column.
        max_period: the slowest wavelength.

    Returns:
        ``(B, dim)`` float32 in ``[-1, 1]``.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class TimeEmbedding(nn.Module):
    """Sinusoidal timestep features followed by a two-layer SiLU MLP.

    Args:
        base_dim: width of the sinusoidal features.
        dim: output width (the ``time_dim`` every time-conditioned block takes).
    """

    def __init__(self, base_dim: int, dim: int) -> None:
        super().__init__()
        self.base_dim = base_dim
        self.mlp = nn.Sequential(nn.Linear(base_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: Tensor) -> Tensor:
        """``t: (B,)`` int64 -> ``(B, dim)``."""
        return self.mlp(timestep_embedding(t, self.base_dim))


# ======================================================================================================
# 3. ResBlock, self-attention, down/upsampling
# ======================================================================================================


class ResBlock(nn.Module):
    """Pre-activation residual block with a FiLM time conditioning (GroupNorm -> SiLU -> conv, twice).

    ``h = conv1(SiLU(GN(x)))``; ``h = GN(h) * (1 + s) + b`` with ``(s, b) = Linear(SiLU(emb))`` (scale-shift norm);
    ``out = skip(x) + conv2(Dropout(SiLU(h)))``.

    Args:
        in_channels: channels of ``x``.
        out_channels: channels of the output.
        time_dim: width of the time embedding ``emb``.
        dropout: dropout probability before the second convolution.
        spatial_dims: 2 (``(B, C, H, W)``, 3x3 convolutions) or 3 (``(B, C, D, H, W)``, 3x3x3 convolutions).
    """

    def __init__(
        self, in_channels: int, out_channels: int, time_dim: int, dropout: float = 0.0, *, spatial_dims: int = 2
    ) -> None:
        super().__init__()
        self.spatial_dims = d = check_spatial_dims(spatial_dims)
        self.norm1 = group_norm(in_channels)
        self.conv1 = conv_nd(d, in_channels, out_channels, 3, padding=1)
        self.film = nn.Sequential(nn.SiLU(), nn.Linear(time_dim, 2 * out_channels))
        self.norm2 = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = conv_nd(d, out_channels, out_channels, 3, padding=1)
        self.skip = nn.Identity() if in_channels == out_channels else conv_nd(d, in_channels, out_channels, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        """``x: (B, C_in, *spatial)``, ``emb: (B, time_dim)`` -> ``(B, C_out, *spatial)``."""
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = _trailing(self.film(emb), h).chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class SelfAttention2d(nn.Module):
    """Multi-head self-attention over all positions of a feature map (``H*W``, or ``D*H*W`` in 3D), residual.

    The name is historical: ``spatial_dims=3`` attends over every voxel (memory grows with the square of the voxel
    count, so use it at coarse levels). :data:`SelfAttention` is an alias.

    Args:
        channels: feature channels ``C``.
        head_channels: channels per head; ``heads = max(1, C // head_channels)``.
        spatial_dims: 2 or 3 (the 1x1 projections are ``Conv2d`` or ``Conv3d``).
    """

    def __init__(self, channels: int, head_channels: int = 64, *, spatial_dims: int = 2) -> None:
        super().__init__()
        self.spatial_dims = d = check_spatial_dims(spatial_dims)
        self.heads = max(1, channels // head_channels)
        if channels % self.heads:
            raise ValueError(f"channels={channels} is not divisible by heads={self.heads}")
        self.norm = group_norm(channels)
        self.qkv = conv_nd(d, channels, 3 * channels, 1)
        self.proj = conv_nd(d, channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        """``x: (B, C, *spatial)`` -> ``(B, C, *spatial)``."""
        b, c = x.shape[:2]
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, -1)  # spatial axes flattened
        q, k, v = (qkv[:, i].transpose(-1, -2) for i in range(3))  # each (B, heads, N, C/heads)
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(d)) v
        out = out.transpose(-1, -2).reshape(x.shape)
        return x + self.proj(out)


SelfAttention = SelfAttention2d


class Downsample(nn.Module):
    """Stride-2 3x3(x3) convolution: ``(B, C_in, *spatial) -> (B, C_out, *spatial / 2)``."""

    def __init__(self, in_channels: int, out_channels: int, *, spatial_dims: int = 2) -> None:
        super().__init__()
        self.conv = conv_nd(spatial_dims, in_channels, out_channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest x2 upsampling followed by a 3x3(x3) convolution: ``(B, C, *spatial) -> (B, C, *2 spatial)``."""

    def __init__(self, channels: int, *, spatial_dims: int = 2) -> None:
        super().__init__()
        self.conv = conv_nd(spatial_dims, channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


# ======================================================================================================
# 4. UNet encoder/decoder levels (guided-diffusion layout: a skip after every block and every downsample)
# ======================================================================================================


class ResAttnBlock(nn.Module):
    """A :class:`ResBlock`, optionally followed by :class:`SelfAttention2d`."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        time_dim: int,
        *,
        attention: bool,
        head_channels: int,
        dropout: float,
        spatial_dims: int = 2,
    ) -> None:
        super().__init__()
        self.res = ResBlock(in_channels, out_channels, time_dim, dropout, spatial_dims=spatial_dims)
        self.attn = SelfAttention2d(out_channels, head_channels, spatial_dims=spatial_dims) if attention else None

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.res(x, emb)
        return self.attn(h) if self.attn is not None else h


class EncoderLevel(nn.Module):
    """``num_res_blocks`` blocks at one resolution, then an optional stride-2 downsample.

    The caller runs :meth:`forward` (the block outputs, each a UNet skip), may modulate the last output (DCE,
    FF-Parser, U-SA act there), and then applies :attr:`down` (whose output is a skip too).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        next_channels: int,
        time_dim: int,
        *,
        num_res_blocks: int,
        attention: bool,
        head_channels: int,
        dropout: float,
        downsample: bool,
        spatial_dims: int = 2,
    ) -> None:
        super().__init__()
        chans = [in_channels] + [out_channels] * num_res_blocks
        self.blocks = nn.ModuleList(
            ResAttnBlock(a, b, time_dim, attention=attention, head_channels=head_channels, dropout=dropout,
                         spatial_dims=spatial_dims)
            for a, b in zip(chans[:-1], chans[1:])
        )
        self.down = Downsample(out_channels, next_channels, spatial_dims=spatial_dims) if downsample else None

    def forward(self, h: Tensor, emb: Tensor) -> list[Tensor]:
        """``h: (B, C_in, *spatial)`` -> the ``num_res_blocks`` block outputs, each ``(B, C_out, *spatial)``."""
        outs = []
        for block in self.blocks:
            h = block(h, emb)
            outs.append(h)
        return outs


class DecoderLevel(nn.Module):
    """``num_res_blocks + 1`` blocks that each concatenate one encoder skip, then an optional x2 upsample."""

    def __init__(
        self,
        in_channels: int,
        skip_channels: Sequence[int],
        out_channels: int,
        time_dim: int,
        *,
        attention: bool,
        head_channels: int,
        dropout: float,
        upsample: bool,
        spatial_dims: int = 2,
    ) -> None:
        super().__init__()
        blocks = []
        ch = in_channels
        for skip in skip_channels:
            blocks.append(
                ResAttnBlock(ch + skip, out_channels, time_dim, attention=attention, head_channels=head_channels,
                             dropout=dropout, spatial_dims=spatial_dims)
            )
            ch = out_channels
        self.blocks = nn.ModuleList(blocks)
        self.up = Upsample(out_channels, spatial_dims=spatial_dims) if upsample else None

    def forward(self, h: Tensor, skips: list[Tensor], emb: Tensor) -> Tensor:
        """Consume skips from the end of ``skips`` (popped in place); returns the level output."""
        for block in self.blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.up(h) if self.up is not None else h


class MiddleBlock(nn.Module):
    """Bottleneck: ResBlock -> self-attention -> ResBlock at constant width."""

    def __init__(
        self, channels: int, time_dim: int, *, head_channels: int, dropout: float, spatial_dims: int = 2
    ) -> None:
        super().__init__()
        self.res1 = ResBlock(channels, channels, time_dim, dropout, spatial_dims=spatial_dims)
        self.attn = SelfAttention2d(channels, head_channels, spatial_dims=spatial_dims)
        self.res2 = ResBlock(channels, channels, time_dim, dropout, spatial_dims=spatial_dims)

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        return self.res2(self.attn(self.res1(h, emb)), emb)


class OutputHead(nn.Module):
    """GroupNorm -> SiLU -> zero-initialised 3x3(x3) conv, so that a fresh denoiser predicts exactly 0."""

    def __init__(self, in_channels: int, out_channels: int, *, spatial_dims: int = 2) -> None:
        super().__init__()
        self.norm = group_norm(in_channels)
        self.conv = conv_nd(spatial_dims, in_channels, out_channels, 3, padding=1)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)

    def forward(self, h: Tensor) -> Tensor:
        return self.conv(F.silu(self.norm(h)))


def build_encoder(
    width: int,
    channel_mult: Sequence[int],
    time_dim: int,
    *,
    num_res_blocks: int,
    attention_levels: Sequence[int],
    head_channels: int,
    dropout: float,
    spatial_dims: int = 2,
) -> tuple[nn.ModuleList, list[int]]:
    """The encoder levels of a UNet whose stem outputs ``width`` channels.

    Level ``i`` works at resolution ``spatial / 2^i`` (every axis) with ``width * channel_mult[i]`` channels; all
    levels but the last end with a downsample. ``spatial_dims`` (2 or 3) is passed to every block.

    Returns:
        ``(levels, skip_channels)``: the levels and the channel count of every skip in push order, starting
        with the stem output.
    """
    chans = [width * m for m in channel_mult]
    levels = nn.ModuleList()
    skips = [width]
    ch = width
    for i, out in enumerate(chans):
        last = i == len(chans) - 1
        levels.append(
            EncoderLevel(ch, out, out if last else chans[i + 1], time_dim, num_res_blocks=num_res_blocks,
                         attention=i in attention_levels, head_channels=head_channels, dropout=dropout,
                         downsample=not last, spatial_dims=spatial_dims)
        )
        skips += [out] * num_res_blocks
        ch = out
        if not last:
            skips.append(chans[i + 1])
            ch = chans[i + 1]
    return levels, skips


def build_decoder(
    width: int,
    channel_mult: Sequence[int],
    time_dim: int,
    skip_channels: Sequence[int],
    *,
    num_res_blocks: int,
    attention_levels: Sequence[int],
    head_channels: int,
    dropout: float,
    spatial_dims: int = 2,
) -> nn.ModuleList:
    """The decoder levels matching :func:`build_encoder` (deepest first), consuming ``skip_channels`` in reverse."""
    chans = [width * m for m in channel_mult]
    skips = list(skip_channels)
    levels = nn.ModuleList()
    ch = chans[-1]
    for i in reversed(range(len(chans))):
        mine = [skips.pop() for _ in range(num_res_blocks + 1)]
        levels.append(
            DecoderLevel(ch, mine, chans[i], time_dim, attention=i in attention_levels, head_channels=head_channels,
                         dropout=dropout, upsample=i > 0, spatial_dims=spatial_dims)
        )
        ch = chans[i]
    return levels


# ======================================================================================================
# 5. Spectral maps on the rfftn grid (the last 2 or 3 axes)
# ======================================================================================================


def rfft_grid_shape(size: Sequence[int]) -> tuple[int, ...]:
    """Shape of the real-FFT spectrum of a ``size`` grid: ``(*size[:-1], size[-1] // 2 + 1)``."""
    return (*(int(s) for s in size[:-1]), int(size[-1]) // 2 + 1)


def resample_rfft_map(m: Tensor, base_size: Sequence[int], size: Sequence[int]) -> Tensor:
    """Resample a map defined on the rfftn bins of a ``base_size`` grid to the bins of a ``size`` grid.

    Each target bin takes the (bilinearly, in 3D trilinearly, interpolated) value the map has at the same
    physical frequency (``(f_y, f_x)`` or ``(f_z, f_y, f_x)``, in cycles per pixel), so a filter keeps its meaning
    (low-pass stays low-pass) at any image size; frequencies beyond the base grid take the border value. A
    constant map stays constant: exactly in 3D (values are interpolated as offsets from the first bin); to a
    float rounding (a few ulp) in 2D, whose arithmetic is kept as it always was.

    Args:
        m: ``(P, *base_size[:-1], base_size[-1] // 2 + 1)`` values in the natural (un-shifted) rfftn layout of a
            ``base_size`` grid, ``base_size`` being ``(H0, W0)`` or ``(D0, H0, W0)``.
        base_size: the grid ``m`` is stored for (2 or 3 sizes).
        size: runtime grid, as many sizes as ``base_size``.

    Returns:
        ``(P, *size[:-1], size[-1] // 2 + 1)`` in the natural rfftn layout of a ``size`` grid (``m`` itself when
        sizes match).
    """
    base, size = tuple(int(s) for s in base_size), tuple(int(s) for s in size)
    n = len(base)
    if n not in (2, 3) or len(size) != n:
        raise ValueError(f"base_size and size must both list 2 or 3 sizes, got {base} and {size}")
    if base == size:
        return m
    grid = _rfft_resample_grid(base, size, str(m.device))
    shift_dims = tuple(range(1, n))
    if n == 2:
        src = torch.fft.fftshift(m, dim=shift_dims)[None].float()
        out = F.grid_sample(src, grid, mode="bilinear", padding_mode="border", align_corners=True)
        return out[0].to(m.dtype)
    src = torch.fft.fftshift(m, dim=shift_dims)[None].float()
    ref = src[:, :, :1, :1, :1]  # per-map offset: interpolating m - ref keeps a constant map exactly constant
    out = F.grid_sample(src - ref, grid, mode="bilinear", padding_mode="border", align_corners=True) + ref
    return out[0].to(m.dtype)


@functools.lru_cache(maxsize=256)
def _rfft_resample_grid(base: tuple[int, ...], size: tuple[int, ...], device: str) -> Tensor:
    """The ``grid_sample`` grid of :func:`resample_rfft_map`, ``(1, *size[:-1], size[-1] // 2 + 1, n)`` float32 on
    ``device``: computed once per (sizes, device) on the host, so a forward pass never waits for the device
    (which a CUDA graph capture forbids) nor redoes it."""

    def to_grid(f: Tensor, f0: Tensor) -> Tensor:  # frequency -> grid_sample coordinate in [-1, 1]
        span = float(f0[-1] - f0[0])
        return 2 * (f - f0[0]) / span - 1 if span > 0 else torch.zeros_like(f)

    # full axes (fftfreq, shifted to ascending order to match the shifted map), then the half last axis
    f0 = [torch.fft.fftshift(torch.fft.fftfreq(s0)) for s0 in base[:-1]] + [torch.fft.rfftfreq(base[-1])]
    g = [to_grid(torch.fft.fftfreq(s), a) for s, a in zip(size[:-1], f0)] + \
        [to_grid(torch.fft.rfftfreq(size[-1]), f0[-1])]  # natural layout of the target
    if len(base) == 2:
        gy, gx = g
        grid = torch.stack(torch.meshgrid(gx, gy, indexing="xy"), dim=-1)[None]  # (1, H, W//2+1, 2) as (x, y)
    else:
        gz, gy, gx = torch.meshgrid(*g, indexing="ij")
        grid = torch.stack([gx, gy, gz], dim=-1)[None]  # (1, D, H, W//2+1, 3) as (x, y, z)
    return grid.to(device=device, dtype=torch.float32)


class FFParser(nn.Module):
    """FF-Parser (MedSegDiff, METHODS 2.1): a learnable per-channel complex filter in the Fourier domain.

    ``M = rfftn(m)`` (orthonormal, over the last 2 or 3 axes), ``M' = A ⊙ M``, ``m' = irfftn(M')``. ``A`` is
    stored as real and imaginary parts on the rfftn grid of ``base_size`` and resampled by physical frequency to
    the runtime spectrum (:func:`resample_rfft_map`), so any feature size works. ``A`` is initialised to
    ``1 + 0j``: the filter starts as the identity (unlike the official code's near-zero start, METHODS 2.2).

    Args:
        channels: feature channels ``C``.
        base_size: ``(H0, W0)`` for 2D maps or ``(D0, H0, W0)`` for 3D maps: the grid on which ``A`` is stored
            (the feature size at the nominal image size); its length fixes the number of spatial axes.
    """

    def __init__(self, channels: int, base_size: Sequence[int]) -> None:
        super().__init__()
        if len(base_size) not in SPATIAL_DIMS:
            raise ValueError(f"base_size must list {' or '.join(map(str, SPATIAL_DIMS))} sizes, got {tuple(base_size)}")
        self.base_size = tuple(int(s) for s in base_size)
        self.spatial_dims = len(self.base_size)
        weight = torch.zeros(2, channels, *rfft_grid_shape(self.base_size))
        weight[0] = 1.0  # A = 1 + 0j: identity filter
        self.weight = nn.Parameter(weight)

    def forward(self, x: Tensor) -> Tensor:
        """``x: (B, C, *spatial)`` real -> filtered, same shape and dtype as ``x`` (FFTs run in float32)."""
        b, c = x.shape[:2]
        spatial = tuple(x.shape[2:])
        if len(spatial) != self.spatial_dims:
            raise ValueError(f"FFParser for {self.spatial_dims}D maps got an input of shape {tuple(x.shape)}")
        dims = tuple(range(-self.spatial_dims, 0))
        with torch.autocast(device_type=x.device.type, enabled=False):
            spec = torch.fft.rfftn(x.float(), dim=dims, norm="ortho")  # M = FFT(m_x)
            a = resample_rfft_map(self.weight.float().reshape(2 * c, *self.weight.shape[2:]), self.base_size, spatial)
            a = a.reshape(2, c, *rfft_grid_shape(spatial))
            spec = spec * torch.complex(a[0], a[1])  # M' = A ⊙ M
            out = torch.fft.irfftn(spec, s=spatial, dim=dims, norm="ortho")  # m_x' = IFFT(M')
        return out.to(x.dtype)
