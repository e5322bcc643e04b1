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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import nn

from diffmis.checkpoint import load_checkpoint, save_checkpoint
from diffmis.config import Config, dump_config, load_config
from diffmis.errors import CheckpointError, ConfigError
from diffmis.hardware import Resolved
from diffmis.training.ema import EMA

__all__ = ["RunFolder", "Position", "MetricsLog", "resolve_run_config"]


def resolve_run_config(config: Optional[str], run_dir: Optional[str], resume: bool,
                       overrides: Sequence[str] = ()) -> tuple[Config, Path]:
    """Config and run folder of a training invocation. On resume the run's own config.yaml is used."""
    if resume:
        if run_dir is None and config is not None:
            cfg0 = load_config(config, overrides)
            run_dir = str(Path(cfg0.experiment.output_dir) / cfg0.experiment.name)
        if run_dir is None:
            raise ConfigError("--resume needs --out RUN (or a config naming the run)")
        saved = Path(run_dir) / "config.yaml"
        if not saved.is_file():
            raise CheckpointError(f"cannot resume: {saved} does not exist")
        return load_config(saved, overrides), Path(run_dir)
    if config is None:
        raise ConfigError("a config file is needed")
    cfg = load_config(config, overrides)
    out = Path(run_dir) if run_dir else Path(cfg.experiment.output_dir) / cfg.experiment.name
    return cfg, out


class MetricsLog:
    """``metrics.jsonl`` (line-buffered) and TensorBoard scalars; a no-op on ranks other than 0."""

    def __init__(self, run_dir: Path, enabled: bool) -> None:
        self.enabled = enabled
        self.tb = None
        self.file = None
        if enabled:
            self.file = open(run_dir / "metrics.jsonl", "a", buffering=1)
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tensorboard"))
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


class RunFolder:
    """A run folder opened for training by one process (rank ``main`` writes; the others only read)."""

    def __init__(self, root: Path, main: bool) -> None:
        self.root = Path(root)
        self.main = main
        self.log: Optional[MetricsLog] = None

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    def start(self, cfg: Config, resume: bool) -> None:
        """Check the folder fits the invocation, write ``config.yaml`` and open the metrics log.

        Raises:
            CheckpointError: a new run into a folder that has checkpoints, or a resume without one.
        """
        if resume and not (self.checkpoints / "last").is_dir():
            raise CheckpointError(f"cannot resume: no checkpoint at {self.checkpoints / 'last'}")
        if not resume and self.checkpoints.exists():
            raise CheckpointError(f"run folder {self.root} already has checkpoints; use --resume or another --out")
        if self.main:
            self.root.mkdir(parents=True, exist_ok=True)
            dump_config(cfg, self.root / "config.yaml")
        self.log = MetricsLog(self.root, self.main)

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
