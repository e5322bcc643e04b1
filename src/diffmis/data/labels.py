"""Declared mask values and their mapping to class indices.

``num_classes`` (K) and ``labels`` (the stored mask value of each class, background first) declare what a mask
may hold:

- K = 1 (binary), ``labels`` None: {0, 1} or {0, 255} (not both 1 and 255 in one mask); class 1 = value > 0.
- K = 1, ``labels = [bg, fg]``: exactly these two values.
- K >= 2, ``labels`` None: values 0..K-1 are the classes; ``labels = [v0, ..., v(K-1)]``: value ``v_k`` is class k.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import numpy as np
from diffmis.errors import ConfigError, DataError

__all__ = ["LabelSpec", "fov_problem"]

_BINARY_SETS = ({0, 1}, {0, 255})


def fmt_values(values: Iterable[int], limit: int = 8) -> str:
    """``{a, b, c}``; more than ``limit`` values are shortened to the first and last few and their count."""
    v = sorted(values)
    if len(v) > limit:
        return "{" + ", ".join(map(str, v[:4])) + f", ... ({len(v) - 6} more) ..., " + ", ".join(map(str, v[-2:])) + "}"
    return "{" + ", ".join(str(x) for x in v) + "}"


def lossy_hint(path: Union[str, Path]) -> str:
    """A sentence for masks stored as JPEG (lossy: compression invents values at every edge), else ''."""
    if Path(path).suffix.lower() in (".jpg", ".jpeg"):
        return ("; the mask is a JPEG file, and JPEG compression is lossy (it invents values around every edge): "
                "save masks losslessly (PNG) from the original labels")
    return ""


def fov_problem(present: Iterable[int]) -> Optional[str]:
    """A message when a field-of-view mask's distinct values are not {0, 1} or {0, 255} (subsets allowed)."""
    found = set(int(v) for v in present)
    if any(found <= s for s in _BINARY_SETS):
        return None
    return f"field-of-view mask is not binary: values {fmt_values(found)}; expected {{0, 1}} or {{0, 255}}"


@dataclass(frozen=True)
class LabelSpec:
    """What a mask file may contain and how it maps to class indices.

    Attributes:
        num_classes: K (1 = binary, foreground channel only).
        values: stored value of each class (background first; 2 values for K = 1), or None for the defaults.
    """

    num_classes: int = 1
    values: Optional[tuple[int, ...]] = None

    @classmethod
    def create(cls, num_classes: int, labels: Optional[Sequence[int]] = None) -> "LabelSpec":
        """Validate ``num_classes``/``labels`` (as in ``DataConfig``) and build the spec.

        Raises:
            ConfigError: wrong number of labels, repeated or negative values.
        """
        if num_classes < 1:
            raise ConfigError(f"data.num_classes={num_classes}: must be >= 1")
        if labels is None:
            return cls(num_classes, None)
        vals = tuple(int(v) for v in labels)
        want = 2 if num_classes == 1 else num_classes
        if len(vals) != want:
            raise ConfigError(f"data.labels={list(vals)}: expected {want} values (background first) for "
                              f"data.num_classes={num_classes}")
        if len(set(vals)) != len(vals) or min(vals) < 0:
            raise ConfigError(f"data.labels={list(vals)}: values must be distinct and non-negative")
        return cls(num_classes, vals)

    @property
    def class_count(self) -> int:
        """Number of class indices a label map holds (2 for binary)."""
        return max(2, self.num_classes)

    def describe(self) -> str:
        """The declared values in words, e.g. ``{0, 1} or {0, 255}``."""
        if self.values is not None:
            return fmt_values(self.values)
        if self.num_classes == 1:
            return "{0, 1} or {0, 255}"
        return fmt_values(range(self.num_classes))

    def problem(self, present: Sequence[int]) -> Optional[str]:
        """A message when the values found in one mask are not allowed, else None.

        Args:
            present: the distinct values found in the mask.
        """
        found = set(int(v) for v in present)
        if self.values is None and self.num_classes == 1:
            if any(found <= s for s in _BINARY_SETS):
                return None
            outside = found - {0, 1, 255}
            if outside:
                return (f"mask values {fmt_values(outside)} are outside the declared labels {self.describe()} "
                        f"(data.num_classes=1)")
            return "mask mixes values 1 and 255; a binary mask holds {0, 1} or {0, 255}"
        allowed = set(self.values) if self.values is not None else set(range(self.num_classes))
        outside = found - allowed
        if outside:
            return (f"mask values {fmt_values(outside)} are outside the declared labels {self.describe()} "
                    f"(data.num_classes={self.num_classes})")
        return None

    def to_classes(self, mask: np.ndarray, path: Union[str, Path]) -> np.ndarray:
        """Map stored values to class indices.

        Args:
            mask: ``(H, W)`` (or any shape) integer array of stored values.
            path: the file it came from (named in errors).

        Returns:
            uint8 array of class indices in ``[0, class_count)``.

        Raises:
            DataError: the mask holds values outside the declared labels.
        """
        if mask.dtype == np.uint8:
            present = np.flatnonzero(np.bincount(mask.ravel(), minlength=256))
        else:
            present = np.unique(mask)
        msg = self.problem(present.tolist())
        if msg:
            raise DataError(f"{path}: {msg}{lossy_hint(path)}")
        if self.values is None and self.num_classes == 1:
            return (mask > 0).astype(np.uint8)
        values = self.values if self.values is not None else tuple(range(self.num_classes))
        if values == tuple(range(len(values))):
            return mask.astype(np.uint8)
        order = np.argsort(values)
        idx = np.searchsorted(np.asarray(values)[order], mask)
        return order[idx].astype(np.uint8)
