"""Name -> class registries. A config's ``name`` picks the class and ``params`` are its keyword arguments."""

from __future__ import annotations

import inspect
from typing import Any, Callable, Generic, TypeVar

__all__ = ["Registry", "MODELS", "SEGMENTORS", "METHODS"]

T = TypeVar("T")


class Registry(Generic[T]):
    """A mapping from names to classes (or factories) filled by the ``@REG.register("name")`` decorator."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, Callable[..., T]] = {}

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        def deco(obj: Callable[..., T]) -> Callable[..., T]:
            if name in self._items and self._items[name] is not obj:
                raise KeyError(f"{self.kind} '{name}' is already registered")
            self._items[name] = obj
            return obj

        return deco

    def get(self, name: str) -> Callable[..., T]:
        if name not in self._items:
            known = ", ".join(sorted(self._items)) or "(none)"
            raise KeyError(f"unknown {self.kind} '{name}'; registered: {known}")
        return self._items[name]

    def build(self, name: str, /, **kwargs: Any) -> T:
        """Instantiate ``name`` with ``kwargs``; an unknown keyword raises a ``TypeError`` naming it."""
        factory = self.get(name)
        try:
            sig = inspect.signature(factory)
        except (TypeError, ValueError):
            sig = None
        if sig is not None and not any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
            unknown = [k for k in kwargs if k not in sig.parameters]
            if unknown:
                allowed = ", ".join(p for p in sig.parameters if p != "self")
                raise TypeError(f"{self.kind} '{name}' got unknown parameter(s) {unknown}; allowed: {allowed}")
        return factory(**kwargs)

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items


MODELS: Registry[Any] = Registry("model")
SEGMENTORS: Registry[Any] = Registry("segmentor")
#: methods by ``experiment.recipe`` (filled by importing :mod:`diffmis.methods`)
METHODS: Registry[Any] = Registry("method")
