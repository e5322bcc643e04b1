"""Discriminative segmentors: thin wrappers over MONAI 2D/3D networks that also return multi-scale features.

A segmentor maps an image to mask logits and exposes its feature maps, ordered fine -> coarse, for the methods
that condition on them (MedSegDiff-V2's anchor and semantic conditions, HiDiff's refiner, PD-DDPM's
pre-segmentation). The MONAI network's own ``forward`` runs unchanged; the features are read by forward hooks
that live only for the duration of one call (so ``copy.deepcopy`` for EMA, pickling and DDP see a plain module).

Every segmentor takes ``spatial_dims`` (2 for ``(B, C, H, W)`` images, the default; 3 for ``(B, C, D, H, W)``
volumes), hands it to MONAI and exposes it as :attr:`Segmentor.spatial_dims`.

Input size: every spatial axis must be divisible by :attr:`Segmentor.size_multiple` (``2 ** downsamplings``);
other sizes raise :class:`~diffmis.errors.InputError` naming the required multiple (resize or pad before calling).

Contents
    1. Output type and base class (hook-based feature capture)
    2. Registered segmentors: "unet", "attention_unet", "segresnet"
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from monai.networks.nets import AttentionUnet, BasicUNet, SegResNet
from monai.networks.nets.attentionunet import AttentionLayer
from torch import Tensor, nn

from diffmis.masks import probabilities
from diffmis.models.layers import check_spatial_dims, check_spatial_size
from diffmis.registry import SEGMENTORS

__all__ = ["SegmentorOutput", "Segmentor", "UNetSegmentor", "AttentionUNetSegmentor", "SegResNetSegmentor"]


# ======================================================================================================
# 1. Output type and base class
# ======================================================================================================


@dataclass
class SegmentorOutput:
    """What a segmentor returns.

    Attributes:
        logits: ``(B, K, *spatial)`` mask logits (sigmoid for K = 1, softmax over channels for K > 1).
        features: feature maps fine -> coarse; ``features[i]`` is ``(B, feature_channels[i], *spatial_i)`` with
            ``spatial_0 = spatial`` for every registered segmentor and every axis of ``spatial_i`` non-increasing.
    """

    logits: Tensor
    features: list[Tensor]


class Segmentor(nn.Module):
    """Base class: runs ``self.net`` and captures the outputs of named submodules as features.

    Subclasses set ``self.net`` (a MONAI network), ``self.feature_modules`` (dotted submodule names of ``net``,
    fine -> coarse), ``self.feature_channels`` (their widths) and ``self.size_multiple``.

    Attributes:
        num_classes: K, the number of mask channels.
        spatial_dims: 2 (images) or 3 (volumes).
        feature_channels: channel count of each returned feature, fine -> coarse.
        size_multiple: every spatial axis must be divisible by this.
    """

    net: nn.Module
    feature_modules: list[str]
    feature_channels: list[int]
    size_multiple: int

    def __init__(self, num_classes: int, spatial_dims: int = 2) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.spatial_dims = check_spatial_dims(spatial_dims)

    def forward(self, image: Tensor) -> SegmentorOutput:
        """Segment ``image: (B, C, *spatial)`` float32 -> :class:`SegmentorOutput` (logits at the input size)."""
        check_spatial_size(image, self.size_multiple, type(self).__name__, self.spatial_dims)
        captured: list[Tensor | None] = [None] * len(self.feature_modules)

        def make_hook(i: int) -> Callable[[nn.Module, object, Tensor], None]:
            def hook(module: nn.Module, inputs: object, output: Tensor) -> None:
                captured[i] = output

            return hook

        handles = [self.net.get_submodule(name).register_forward_hook(make_hook(i))
                   for i, name in enumerate(self.feature_modules)]
        try:
            logits = self.net(image)
        finally:
            for handle in handles:
                handle.remove()
        missing = [name for name, f in zip(self.feature_modules, captured) if f is None]
        if missing:
            raise RuntimeError(f"{type(self).__name__}: feature module(s) {missing} did not run")
        return SegmentorOutput(logits=logits, features=captured)  # type: ignore[arg-type]

    def probabilities(self, logits: Tensor) -> Tensor:
        """``(B, K, *spatial)`` logits -> probabilities in [0, 1] (:func:`diffmis.masks.probabilities`)."""
        return probabilities(logits)


# ======================================================================================================
# 2. Registered segmentors
# ======================================================================================================


@SEGMENTORS.register("unet")
class UNetSegmentor(Segmentor):
    """MONAI ``BasicUNet`` (2D or 3D): four downsamplings, so every spatial axis must be divisible by 16.

    Features (fine -> coarse): the four decoder outputs at H, H/2, H/4, H/8 and the bottleneck at H/16 (every
    axis), with channels ``[features[5], features[1], features[2], features[3], features[4]]``.

    Args:
        in_channels: image channels C.
        num_classes: K mask channels.
        features: the six BasicUNet widths (five encoder levels, last decoder level).
        dropout: dropout probability inside the conv blocks.
        norm: MONAI norm name (``"instance"``, ``"batch"``, ``"group"`` ...).
        spatial_dims: 2 or 3.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        *,
        features: Sequence[int] = (32, 32, 64, 128, 256, 32),
        dropout: float = 0.0,
        norm: str = "instance",
        spatial_dims: int = 2,
    ) -> None:
        super().__init__(num_classes, spatial_dims)
        f = tuple(features)
        if len(f) != 6:
            raise ValueError(f"features must list 6 widths, got {len(f)}")
        self.net = BasicUNet(spatial_dims=self.spatial_dims, in_channels=in_channels, out_channels=num_classes,
                             features=f, dropout=dropout, norm=norm)
        self.feature_modules = ["upcat_1", "upcat_2", "upcat_3", "upcat_4", "down_4"]
        self.feature_channels = [f[5], f[1], f[2], f[3], f[4]]
        self.size_multiple = 16


@SEGMENTORS.register("attention_unet")
class AttentionUNetSegmentor(Segmentor):
    """MONAI ``AttentionUnet`` (2D or 3D, Oktay et al.): ``len(channels) - 1`` stride-2 levels.

    Features (fine -> coarse): the output of every attention-gated decoder level (``channels[0]`` at H, ...,
    ``channels[-2]``) and the bottleneck block (``channels[-1]``); ``feature_channels == list(channels)``.

    Args:
        in_channels: image channels C.
        num_classes: K mask channels.
        channels: widths from the top level down (at least 2).
        dropout: dropout probability.
        spatial_dims: 2 or 3.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        *,
        channels: Sequence[int] = (32, 64, 128, 256, 512),
        dropout: float = 0.0,
        spatial_dims: int = 2,
    ) -> None:
        super().__init__(num_classes, spatial_dims)
        ch = tuple(channels)
        if len(ch) < 2:
            raise ValueError("channels must list at least 2 widths")
        self.net = AttentionUnet(spatial_dims=self.spatial_dims, in_channels=in_channels, out_channels=num_classes,
                                 channels=ch, strides=(2,) * (len(ch) - 1), dropout=dropout)
        # Nested AttentionLayers in registration (= depth-first) order run from the full-resolution level down.
        layers = [name for name, mod in self.net.named_modules() if isinstance(mod, AttentionLayer)]
        self.feature_modules = [*layers, f"{layers[-1]}.submodule"]
        self.feature_channels = list(ch)
        self.size_multiple = 2 ** (len(ch) - 1)


@SEGMENTORS.register("segresnet")
class SegResNetSegmentor(Segmentor):
    """MONAI ``SegResNet`` (2D or 3D, Myronenko): ``len(blocks_down) - 1`` stride-2 levels.

    Features (fine -> coarse): the decoder levels at H, H/2, ... (``init_filters * 2^i`` channels) and the
    deepest encoder level (``init_filters * 2^(len(blocks_down) - 1)``).

    Args:
        in_channels: image channels C.
        num_classes: K mask channels.
        init_filters: width of the first level (a multiple of 8: GroupNorm uses 8 groups).
        blocks_down: residual blocks per encoder level.
        blocks_up: residual blocks per decoder level (``len(blocks_down) - 1`` entries).
        dropout: dropout probability after the first convolution (None: no dropout).
        spatial_dims: 2 or 3.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        *,
        init_filters: int = 16,
        blocks_down: Sequence[int] = (1, 2, 2, 4),
        blocks_up: Sequence[int] = (1, 1, 1),
        dropout: float | None = None,
        spatial_dims: int = 2,
    ) -> None:
        super().__init__(num_classes, spatial_dims)
        if len(blocks_up) != len(blocks_down) - 1:
            raise ValueError("blocks_up must have len(blocks_down) - 1 entries")
        self.net = SegResNet(spatial_dims=self.spatial_dims, in_channels=in_channels, out_channels=num_classes,
                             init_filters=init_filters, blocks_down=tuple(blocks_down), blocks_up=tuple(blocks_up),
                             dropout_prob=dropout)
        n_up = len(blocks_up)
        self.feature_modules = [f"up_layers.{i}" for i in reversed(range(n_up))] + [f"down_layers.{n_up}"]
        self.feature_channels = [init_filters * 2**i for i in range(n_up + 1)]
        self.size_multiple = 2**n_up
