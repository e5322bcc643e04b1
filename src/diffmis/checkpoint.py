"""Checkpoints: safetensors weights + a JSON state, written atomically; no pickle is ever loaded.

Layout of ``RUN/checkpoints/<tag>/`` (tag ``last`` or ``best``)::

    model.safetensors       the method's state_dict (all sub-networks)
    ema.safetensors         EMA shadow of the averaged sub-module (when EMA is on)
    optimizer.safetensors   every tensor of every optimizer state, keyed "opt<i>/<param index>/<name>"
    state.json              step, epoch, position in the epoch, optimizer param groups and scalar states,
                            RNG states, best metric, recipe/model names, diffmis version, resolved config
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from diffmis import __version__
from diffmis.errors import CheckpointError

__all__ = ["save_checkpoint", "load_checkpoint", "load_weights_into", "read_state", "capture_rng", "restore_rng",
           "recover_checkpoints", "has_checkpoint"]


def _tensors_for_save(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses shared storage; a contiguous CPU clone of each tensor is safe and small here
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in sd.items()}


def capture_rng(generator: Optional[torch.Generator]) -> dict[str, Any]:
    """All RNG states that influence training, as JSON-able data."""
    np_state = np.random.get_state()
    out: dict[str, Any] = {
        "torch": torch.get_rng_state().tolist(),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
    }
    if generator is not None:
        out["generator"] = generator.get_state().tolist()
    if torch.cuda.is_available():
        out["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return out


def restore_rng(state: dict[str, Any], generator: Optional[torch.Generator]) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    n = state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    p = state["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))
    if generator is not None and "generator" in state:
        generator.set_state(torch.tensor(state["generator"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def _split_optimizer(opt: torch.optim.Optimizer, idx: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, st in sd["state"].items():
        for name, val in st.items():
            if isinstance(val, torch.Tensor):
                tensors[f"opt{idx}/{pid}/{name}"] = val
            else:
                scalars.setdefault(str(pid), {})[name] = val
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _join_optimizer(opt: torch.optim.Optimizer, idx: int, tensors: dict[str, torch.Tensor],
                    meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    prefix = f"opt{idx}/"
    for key, val in tensors.items():
        if key.startswith(prefix):
            _, pid, name = key.split("/", 2)
            state.setdefault(int(pid), {})[name] = val
    for pid, sc in meta["scalars"].items():
        state.setdefault(int(pid), {}).update(sc)
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(
    directory: Union[str, Path],
    method: nn.Module,
    *,
    step: int,
    epoch: int = 0,
    batch_in_epoch: int = 0,
    optimizers: Sequence[torch.optim.Optimizer] = (),
    ema_shadow: Optional[dict[str, torch.Tensor]] = None,
    ema_updates: int = 0,
    generator: Optional[torch.Generator] = None,
    config: Optional[dict[str, Any]] = None,
    extra: Optional[dict[str, Any]] = None,
) -> Path:
    """Write a checkpoint folder atomically (a temporary sibling folder renamed into place).

    Raises:
        CheckpointError: the folder could not be written (disk full, no permission, I/O error): the message says
            why and how much space was needed; the previous checkpoint of that name is left as it was.
    """
    directory = Path(directory)
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.tmp"))
    except OSError as err:
        raise CheckpointError(f"cannot write checkpoint {directory}: {err.strerror or err}") from None
    try:
        save_file(_tensors_for_save(method.state_dict()), str(tmp / "model.safetensors"))
        if ema_shadow is not None:
            save_file(_tensors_for_save(ema_shadow), str(tmp / "ema.safetensors"))
        opt_tensors: dict[str, torch.Tensor] = {}
        opt_meta = []
        for i, opt in enumerate(optimizers):
            t, m = _split_optimizer(opt, i)
            opt_tensors.update(t)
            opt_meta.append(m)
        if optimizers:
            save_file(_tensors_for_save(opt_tensors), str(tmp / "optimizer.safetensors"))
        state = {
            "diffmis_version": __version__,
            "step": step,
            "epoch": epoch,
            "batch_in_epoch": batch_in_epoch,
            "ema_updates": ema_updates,
            "optimizers": opt_meta,
            "rng": capture_rng(generator),
            "config": config,
            **(extra or {}),
        }
        (tmp / "state.json").write_text(json.dumps(state))
        old = directory.with_name(f".{directory.name}.old")
        if old.exists():
            shutil.rmtree(old)
        if directory.exists():
            os.replace(directory, old)
        os.replace(tmp, directory)
        if old.exists():
            shutil.rmtree(old)
    except (OSError, SafetensorError) as err:
        written = sum(f.stat().st_size for f in tmp.glob("*") if f.is_file()) if tmp.exists() else 0
        shutil.rmtree(tmp, ignore_errors=True)
        need = _state_bytes(method, optimizers, ema_shadow)
        free = shutil.disk_usage(directory.parent).free if directory.parent.exists() else 0
        kept = "the previous checkpoint is intact" if directory.is_dir() else "no earlier checkpoint of this name"
        raise CheckpointError(
            f"cannot write checkpoint {directory}: {getattr(err, 'strerror', None) or err} (about "
            f"{need / 2**20:.0f} MiB needed, {free / 2**20:.0f} MiB free on that disk; {written / 2**20:.0f} MiB "
            f"had been written and were removed); {kept}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def _state_bytes(method: nn.Module, optimizers: Sequence[torch.optim.Optimizer],
                 ema_shadow: Optional[dict[str, torch.Tensor]]) -> int:
    """Bytes of the tensors a checkpoint writes (weights, EMA, optimizer state)."""
    n = sum(t.numel() * t.element_size() for t in method.state_dict().values())
    n += sum(t.numel() * t.element_size() for t in (ema_shadow or {}).values())
    for opt in optimizers:
        for st in opt.state_dict()["state"].values():
            n += sum(v.numel() * v.element_size() for v in st.values() if isinstance(v, torch.Tensor))
    return n


def recover_checkpoints(folder: Union[str, Path]) -> list[str]:
    """Tidy ``RUN/checkpoints`` after a crash; returns what was done, one sentence each.

    A save writes ``.<tag>.tmp*`` completely (``state.json`` last), moves ``<tag>`` to ``.<tag>.old``, renames
    the temporary folder to ``<tag>`` and deletes ``.<tag>.old``. A crash between the renames leaves no ``<tag>``:
    the newest complete one of the temporary folder and ``.<tag>.old`` becomes ``<tag>`` again. Incomplete
    temporary folders and leftover ``.old`` folders are deleted.
    """
    folder = Path(folder)
    done: list[str] = []
    if not folder.is_dir():
        return done
    for tag in ("last", "best"):
        target = folder / tag
        old = folder / f".{tag}.old"
        tmps = sorted(folder.glob(f".{tag}.tmp*"))
        complete = [t for t in tmps if (t / "state.json").is_file() and (t / "model.safetensors").is_file()]
        if not target.exists():
            candidates = complete + ([old] if (old / "state.json").is_file() else [])
            if candidates:
                best = max(candidates, key=lambda c: int(read_state(c).get("step", -1)))
                os.replace(best, target)
                done.append(f"recovered checkpoints/{tag} (step {read_state(target).get('step')}) from a save "
                            f"interrupted between its renames ({best.name})")
        for leftover in [*tmps, old]:
            if leftover.exists():
                shutil.rmtree(leftover, ignore_errors=True)
                done.append(f"removed the leftover of an interrupted save: checkpoints/{leftover.name}")
    return done


def has_checkpoint(folder: Union[str, Path]) -> bool:
    """Whether ``RUN/checkpoints`` holds a complete ``last`` or ``best`` checkpoint."""
    folder = Path(folder)
    return any((folder / tag / "state.json").is_file() for tag in ("last", "best"))


def read_state(directory: Union[str, Path]) -> dict[str, Any]:
    path = Path(directory) / "state.json"
    if not path.is_file():
        raise CheckpointError(f"no checkpoint state at {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"checkpoint state {path} is corrupt: {err}") from None


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"missing checkpoint file {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"cannot read {path}: {err}") from None


def load_weights_into(module: nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Strictly load ``tensors`` into ``module``; the error names the first mismatched tensor.

    Raises:
        CheckpointError: a key missing on either side, or a shape mismatch.
    """
    own = module.state_dict()
    for key, val in own.items():  # model order: the first mismatch as the model sees it
        if key not in tensors:
            raise CheckpointError(
                f"checkpoint {source} does not fit this model: tensor '{key}' {tuple(val.shape)} is missing "
                f"from the checkpoint (it has {len(tensors)} tensors, the model {len(own)})")
        if tuple(tensors[key].shape) != tuple(val.shape):
            raise CheckpointError(
                f"checkpoint {source} does not fit this model: tensor '{key}' has shape "
                f"{tuple(tensors[key].shape)} in the checkpoint but {tuple(val.shape)} in the model")
    extra = [k for k in tensors if k not in own]
    if extra:
        raise CheckpointError(f"checkpoint {source} does not fit this model: unexpected tensor '{extra[0]}' "
                              f"(and {len(extra) - 1} more)")
    module.load_state_dict(tensors, strict=True)


def load_checkpoint(
    directory: Union[str, Path],
    method: nn.Module,
    *,
    optimizers: Sequence[torch.optim.Optimizer] = (),
    generator: Optional[torch.Generator] = None,
    restore_rng_state: bool = False,
    expect: Optional[dict[str, str]] = None,
) -> dict[str, Any]:
    """Load a checkpoint folder into ``method`` (and optimizers/RNG for an exact resume).

    Args:
        expect: e.g. {"recipe": "hidiff", "model": "bbdm"}; a checkpoint written by another recipe or model
            raises a CheckpointError naming both before any tensor is compared.
    Returns:
        The state dict (step, epoch, ...), with the EMA shadow under "ema_shadow" when present.
    """
    directory = Path(directory)
    state = read_state(directory)
    cfg = state.get("config") or {}
    if expect:
        have = {"recipe": (cfg.get("experiment") or {}).get("recipe"), "model": (cfg.get("model") or {}).get("name")}
        for key, want in expect.items():
            if have.get(key) is not None and want is not None and have[key] != want:
                raise CheckpointError(
                    f"checkpoint {directory} was written by {key} '{have[key]}', but this config builds "
                    f"{key} '{want}'")
    load_weights_into(method, _load_tensors(directory / "model.safetensors"), str(directory))
    if (directory / "ema.safetensors").is_file():
        state["ema_shadow"] = _load_tensors(directory / "ema.safetensors")
    if optimizers:
        tensors = _load_tensors(directory / "optimizer.safetensors")
        metas = state.get("optimizers") or []
        if len(metas) != len(optimizers):
            raise CheckpointError(f"checkpoint {directory} has {len(metas)} optimizer(s), training needs "
                                  f"{len(optimizers)}")
        for i, (opt, meta) in enumerate(zip(optimizers, metas)):
            _join_optimizer(opt, i, tensors, meta)
    if restore_rng_state:
        restore_rng(state["rng"], generator)
    return state
