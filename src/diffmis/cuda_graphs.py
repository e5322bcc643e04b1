"""CUDA graphs for sampling: each reverse step's network call replayed from a captured graph.

A diffusion sampler calls one network ``steps`` times per batch with inputs of the same shapes. On a GPU these
networks (a few million parameters, hundreds of small kernels) are bound by kernel launches, not arithmetic: a
CUDA graph launches the whole forward pass at once. :class:`StepGraphs` patches a module's ``forward`` while
it is active (``with graphs.active(): ...``): each call copies its tensors into the static inputs of the graph
captured for that signature (shapes, dtypes, strides, autocast state) and replays it. The first call of a
signature runs the network eagerly (warm-up, on a side stream, as CUDA requires) and captures it; later calls,
the rest of that batch's steps and every later batch of that shape, replay. The condition tensors a method
passes each step (the encoded image) are inputs like ``x_t`` and ``t``, so one graph serves every image.

Only inference on CUDA tensors is graphed (a call with gradients enabled or any CPU tensor runs eagerly); a
signature whose capture fails (a network that syncs with the host, say) runs eagerly from then on, and the error
is kept in :attr:`StepGraphs.errors`. Autocast runs without its weight-cast cache inside a graph (a cached cast
made during capture would be freed behind the graph's back); the casts are replayed with the graph.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

__all__ = ["StepGraphs"]


def _autocast_state() -> tuple[bool, torch.dtype]:
    try:
        return torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
    except (AttributeError, TypeError):  # torch < 2.4: the CUDA-only spellings
        return torch.is_autocast_enabled(), torch.get_autocast_gpu_dtype()


class _Graph:
    def __init__(self, graph: torch.cuda.CUDAGraph, inputs: list[Any], output: Any) -> None:
        self.graph, self.inputs, self.output = graph, inputs, output


class StepGraphs:
    """Captured CUDA graphs of ``module.forward``, one per input signature (at most ``max_graphs``, least
    recently used dropped first).

    Args:
        module: the network a sampler evaluates at every step (:meth:`diffmis.methods.Method.step_network`).
        warmup: eager calls on a side stream before a capture.
        max_graphs: signatures kept (each graph holds its own activation memory).
    """

    def __init__(self, module: nn.Module, *, warmup: int = 2, max_graphs: int = 4) -> None:
        self.module = module
        self.warmup = int(warmup)
        self.max_graphs = int(max_graphs)
        self.graphs: OrderedDict[tuple[Any, ...], _Graph] = OrderedDict()
        self.failed: set[tuple[Any, ...]] = set()
        self.errors: list[str] = []
        self.captures = 0
        self.replays = 0
        self.eager_calls = 0
        self._forward: Callable[..., Any] = module.forward

    # ---- patching --------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def active(self) -> Iterator["StepGraphs"]:
        """While active, calls of the module go through :meth:`__call__` (graph replay where possible)."""
        had = "forward" in self.module.__dict__
        previous = self.module.__dict__.get("forward")
        self._forward = previous if had else type(self.module).forward.__get__(self.module)
        self.module.forward = self  # type: ignore[method-assign]
        try:
            yield self
        finally:
            if had:
                self.module.forward = previous  # type: ignore[method-assign]
            else:
                del self.module.forward

    # ---- calls -----------------------------------------------------------------------------------------------

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        leaves, spec = tree_flatten((args, kwargs))
        tensors = [x for x in leaves if isinstance(x, torch.Tensor)]
        if torch.is_grad_enabled() or not tensors or any(x.device.type != "cuda" for x in tensors):
            self.eager_calls += 1
            return self._forward(*args, **kwargs)
        key = (str(spec), tuple(("T", tuple(x.shape), x.dtype, x.device, x.stride()) if isinstance(x, torch.Tensor)
                               else ("V", repr(x)) for x in leaves), _autocast_state())
        if key in self.failed:
            self.eager_calls += 1
            return self._forward(*args, **kwargs)
        g = self.graphs.get(key)
        if g is None:
            try:
                g = self._capture(leaves, spec)
            except Exception as err:  # noqa: BLE001 - any capture failure falls back to eager calls
                self.failed.add(key)
                cause = err.__context__ or err.__cause__  # a failed capture's first error, under its exit's
                self.errors.append((f"{type(err).__name__}: {err}" + (f" (after {type(cause).__name__}: {cause})"
                                                                       if cause is not None else ""))[:800])
                torch.cuda.synchronize()
                self.eager_calls += 1
                return self._forward(*args, **kwargs)
            self.graphs[key] = g
            while len(self.graphs) > self.max_graphs:
                self.graphs.popitem(last=False)
        else:
            self.graphs.move_to_end(key)
        for dst, src in zip(g.inputs, leaves):
            if isinstance(dst, torch.Tensor):
                dst.copy_(src)
        g.graph.replay()
        self.replays += 1
        return tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, g.output)

    def _capture(self, leaves: list[Any], spec: Any) -> _Graph:
        inputs = [x.detach().clone() if isinstance(x, torch.Tensor) else x for x in leaves]
        args, kwargs = tree_unflatten(inputs, spec)
        enabled, dtype = _autocast_state()

        def run() -> Any:
            with torch.autocast("cuda", dtype=dtype, enabled=enabled, cache_enabled=False):
                return self._forward(*args, **kwargs)

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(max(1, self.warmup)):
                run()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            output = run()
        self.captures += 1
        return _Graph(graph, inputs, output)

    def stats(self) -> dict[str, Any]:
        """Captures, replays, eager calls and capture errors so far (for benchmark records)."""
        return {"captures": self.captures, "replays": self.replays, "eager_calls": self.eager_calls,
                "graphs_kept": len(self.graphs), "errors": list(self.errors)}
