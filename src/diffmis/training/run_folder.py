"""The run folder of a training run: config, metrics log, checkpoints. Rank 0 alone writes.

::

    RUN/config.yaml            resolved config (reloads identically)
    RUN/metrics.jsonl          one JSON object per line: a setup line (resolved precision, threads, CPU), train
                               lines (loss terms, lr, images/s), val lines (Dice)
    RUN/tensorboard/           the same scalars for TensorBoard
    RUN/checkpoints/last/      see ``diffmis.checkpoint``; ``best/`` holds the best validation Dice
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from diffmis.checkpoint import has_checkpoint, load_checkpoint, read_state, recover_checkpoints, save_checkpoint
from diffmis.config import Config, dump_config, load_config
from diffmis.errors import CheckpointError, ConfigError
from diffmis.hardware import Resolved
from diffmis.training.ema import EMA
from diffmis.utils import atomic_write_text

__all__ = ["RunFolder", "Position", "MetricsLog", "resolve_run_config", "config_changes", "RESUMABLE_CHANGES"]


def resolve_run_config(config: Optional[str], run_dir: Optional[str], resume: bool,
                       overrides: Sequence[str] = ()) -> tuple[Config, Path]:
    """Config and run folder of a training invocation.

    On resume the run's own ``config.yaml`` is used, or ``config`` when one is given (then its settings that a
    resumed run may change take effect, and any other difference is refused when training starts).
    """
    if resume:
        cfg0 = load_config(config, overrides) if config is not None else None
        if run_dir is None and cfg0 is not None:
            run_dir = str(Path(cfg0.experiment.output_dir) / cfg0.experiment.name)
        if run_dir is None:
            raise ConfigError("--resume needs --out RUN (or a config naming the run)")
        saved = Path(run_dir) / "config.yaml"
        if not saved.is_file():
            raise CheckpointError(f"cannot resume: {saved} does not exist")
        return (cfg0 if cfg0 is not None else load_config(saved, overrides)), Path(run_dir)
    if config is None:
        raise ConfigError("a config file is needed")
    cfg = load_config(config, overrides)
    out = Path(run_dir) if run_dir else Path(cfg.experiment.output_dir) / cfg.experiment.name
    return cfg, out


class MetricsLog:
    """``metrics.jsonl`` (line-buffered) and TensorBoard scalars; a no-op on ranks other than 0."""

    def __init__(self, run_dir: Path, enabled: bool, purge_step: Optional[int] = None) -> None:
        self.enabled = enabled
        self.tb = None
        self.file = None
        if enabled:
            self.file = open(run_dir / "metrics.jsonl", "a", buffering=1)
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=purge_step)
            except Exception:  # tensorboard missing or broken: the jsonl log still has everything
                self.tb = None

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        assert self.file is not None
        self.file.write(json.dumps(record) + "\n")
        if self.tb is not None:
            phase = record.get("phase", "train")
            for k, v in record.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step":
                    self.tb.add_scalar(f"{phase}/{k}", v, record["step"])

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.tb is not None:
            self.tb.close()


@dataclass
class Position:
    """Where training stands: optimizer steps done, the data position, the best validation Dice so far."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    best: Optional[float] = None


#: config keys a resumed run may change (the run's model, data geometry and method stay as they were)
RESUMABLE_CHANGES = ("experiment.output_dir", "experiment.name", "data.root", "data.num_workers", "data.cache",
                     "train.max_steps", "train.max_minutes", "train.val_every", "train.val_max_batches",
                     "train.log_every", "train.ckpt_every", "train.progress", "train.precision", "train.channels_last",
                     "train.calibrate", "sample.")


def config_changes(saved: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config dicts."""
    out: list[str] = []
    for k in sorted(set(saved) | set(new)):
        a, b = saved.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_changes(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}")
    return out


class RunFolder:
    """A run folder opened for training by one process (rank ``main`` writes; the others only read).

    The writing process holds an exclusive lock on ``RUN/.lock`` (``flock``) for the whole run, so a second
    ``train`` into the same folder fails at once, naming the holder.
    """

    def __init__(self, root: Path, main: bool) -> None:
        self.root = Path(root)
        self.main = main
        self.log: Optional[MetricsLog] = None
        self._lock: Optional[Any] = None

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    def _acquire(self) -> None:
        import fcntl
        import socket

        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fh = open(self.root / ".lock", "a+")
        except OSError as err:
            raise CheckpointError(f"cannot write the run folder {self.root}: {err.strerror or err}") from None
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            fh.close()
            raise CheckpointError(f"run folder {self.root} is in use by {holder}; wait for it to finish or train "
                                  "into another --out") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"diffmis train (pid {os.getpid()} on {socket.gethostname()})\n")
        fh.flush()
        self._lock = fh

    def start(self, cfg: Config, resume: bool, log: Callable[[str], None] = print) -> list[str]:
        """Lock the folder, check it fits the invocation, write ``config.yaml`` and open the metrics log.

        A new run into a folder whose earlier start saved no checkpoint (a failed start) reuses it: its metrics
        log and TensorBoard files are replaced. Returns the changes a resume applies to the saved config.

        Raises:
            CheckpointError: the folder is in use, a new run into a folder that has checkpoints, a resume without
                one, or a resume that changes the model, data geometry or method.
        """
        changes: list[str] = []
        if self.main:
            self._acquire()
            for line in recover_checkpoints(self.checkpoints):
                log(f"run folder {self.root}: {line}")
        if resume and not (self.checkpoints / "last" / "state.json").is_file():
            raise CheckpointError(f"cannot resume: no checkpoint at {self.checkpoints / 'last'}")
        if not resume and has_checkpoint(self.checkpoints):
            raise CheckpointError(f"run folder {self.root} already has checkpoints; use --resume or another --out")
        if resume:
            saved = read_state(self.checkpoints / "last").get("config") or {}
            changes = config_changes(saved, cfg.to_dict())
            refused = [c for c in changes if not c.startswith(RESUMABLE_CHANGES)]
            if saved and refused:
                raise CheckpointError(
                    f"--resume would change {', '.join(refused)} of the run in {self.root}; a resumed run keeps its "
                    f"model, data geometry and method (start a new run with --out to change them)")
        if self.main:
            if not resume:
                for stale in (self.root / "metrics.jsonl", self.root / "tensorboard"):
                    if stale.exists():  # from a start that never saved a checkpoint
                        shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
            dump_config(cfg, self.root / "config.yaml")
        return changes

    def open_log(self, step: int) -> MetricsLog:
        """Open the metrics log; on a resume it is first cut back to ``step`` (the lines written after the
        checkpoint would otherwise appear twice), and TensorBoard purges the events after it."""
        if self.main and step > 0 and (self.root / "metrics.jsonl").is_file():
            keep = []
            for line in (self.root / "metrics.jsonl").read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(rec, dict) and int(rec.get("step", 0)) <= step and rec.get("phase") != "stopped":
                    keep.append(line)
            atomic_write_text(self.root / "metrics.jsonl", "".join(f"{ln}\n" for ln in keep))
        self.log = MetricsLog(self.root, self.main, purge_step=step + 1 if step > 0 else None)
        return self.log

    def save(self, tag: str, method: nn.Module, pos: Position, *, optimizers: Sequence[torch.optim.Optimizer],
             scalers: Sequence[torch.amp.GradScaler], ema: Optional[EMA], generator: torch.Generator, cfg: Config,
             resolved: Resolved) -> None:
        """Write checkpoint ``tag`` (``last`` / ``best``) atomically: everything an exact resume needs."""
        if not self.main:
            return
        save_checkpoint(self.checkpoints / tag, method, step=pos.step, epoch=pos.epoch,
                        batch_in_epoch=pos.batch_in_epoch, optimizers=optimizers,
                        ema_shadow=ema.shadow if ema else None, ema_updates=ema.num_updates if ema else 0,
                        generator=generator, config=cfg.to_dict(),
                        extra={"best_dice": pos.best, "recipe": cfg.experiment.recipe, "resolved": resolved.record(),
                               "grad_scalers": [sc.state_dict() for sc in scalers]})

    def restore(self, method: nn.Module, *, optimizers: Sequence[torch.optim.Optimizer],
                scalers: Sequence[torch.amp.GradScaler], ema: Optional[EMA], generator: torch.Generator,
                cfg: Config, device: torch.device) -> Position:
        """Load ``checkpoints/last`` into the method, optimizers, scalers, EMA and RNGs; return its position."""
        state = load_checkpoint(self.checkpoints / "last", method, optimizers=optimizers, generator=generator,
                                restore_rng_state=True,
                                expect={"recipe": cfg.experiment.recipe, "model": cfg.model.name})
        for scaler, sd in zip(scalers, state.get("grad_scalers") or []):
            scaler.load_state_dict(sd)
        if ema is not None and "ema_shadow" in state:
            ema.shadow = {k: v.to(device) for k, v in state["ema_shadow"].items()}
            ema.num_updates = state.get("ema_updates", 0)
        return Position(state["step"], state["epoch"], state["batch_in_epoch"], state.get("best_dice"))

    def close(self) -> None:
        if self.log is not None:
            self.log.close()
        if self._lock is not None:
            self._lock.close()  # releases the flock
            self._lock = None
