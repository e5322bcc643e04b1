"""The training loop: ``train(cfg)`` turns a config into a run folder. Read it top to bottom.

The loop knows methods only through :class:`diffmis.methods.Method`: its parameter groups (one AdamW each), the
phases of an iteration (each an optimizer step on one group; a method may run several per iteration), and the
EMA module. Data order lives in ``batches.py``, validation in ``validation.py``, the run folder and its
checkpoints in ``run_folder.py``, the rank helpers in ``distributed.py``.

Distributed: launched by torchrun, every rank builds the same model (rank 0's weights are broadcast), reads its
own shard of each epoch and averages gradients with one all-reduce per optimizer step (the arithmetic of DDP,
done by hand because a phase may run a network several times). Seeds are ``seed + rank``.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from diffmis.config import Config
from diffmis.data import build_dataset
from diffmis.errors import DiffmisError
from diffmis.hardware import Resolved, cpu_info, prefer_fast_kernels, resolve_for
from diffmis.methods import Method, Phase, build
from diffmis.training import distributed as distu
from diffmis.training.batches import Batches
from diffmis.training.ema import EMA
from diffmis.training.run_folder import Position, RunFolder
from diffmis.training.validation import validate
from diffmis.utils import autocast

__all__ = ["train", "TrainResult", "TrainingError", "TrainingStopped"]


class TrainingError(DiffmisError):
    """Training stopped (non-finite loss, ...); the message says why and what was saved."""


class TrainingStopped(TrainingError):
    """A signal (SIGTERM from ``docker stop``, Slurm, Kubernetes; SIGUSR1 from schedulers) stopped training after
    ``last`` was saved; ``--resume`` continues. ``signum`` is the signal's number."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum


class _Signalled(Exception):
    def __init__(self, signum: int) -> None:
        self.signum = signum


class _SignalStop:
    """While it is installed, SIGTERM and SIGUSR1 raise :class:`_Signalled` in the main thread (so the loop saves
    ``last`` before it stops); :meth:`restore` puts the previous handlers back."""

    def __init__(self) -> None:
        import signal
        import threading

        self.previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for name in ("SIGTERM", "SIGUSR1"):
                sig = getattr(signal, name, None)
                if sig is not None:
                    self.previous[sig] = signal.signal(sig, self._raise)

    @staticmethod
    def _raise(signum: int, frame: Any) -> None:
        raise _Signalled(signum)

    def restore(self) -> None:
        import signal

        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    stopped: str  # "max_steps" | "max_minutes" | "stop_after"
    best_dice: Optional[float] = None
    last_val: dict[str, Any] = field(default_factory=dict)
    images_per_s: Optional[float] = None
    seconds: float = 0.0
    #: the trained method (last weights, EMA not applied), for in-process use
    method: Optional[Method] = None


def lr_factor(step: int, cfg: Config, time_share: float = 0.0) -> float:
    """Learning-rate multiplier at ``step``: linear warm-up, then constant, cosine or poly decay.

    The decay's progress is the larger of the steps' share of ``train.max_steps`` and ``time_share``, the share of
    this invocation's ``train.max_minutes`` spent so far: a run that its time budget ends decays to its end too
    (with only ``max_steps`` a long ``max_steps`` would leave it undecayed), and one that ``max_steps`` ends decays
    by its steps as before."""
    tc = cfg.train
    if tc.warmup_steps and step < tc.warmup_steps:
        return (step + 1) / tc.warmup_steps
    total = max(1, tc.max_steps - tc.warmup_steps)
    k = min(max(0, step - tc.warmup_steps), total)
    progress = max(k / total, min(1.0, max(0.0, time_share)))
    if tc.lr_schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if tc.lr_schedule == "poly":  # lr_k = lr_0 (1 - k / K)^0.9
        return (1.0 - progress) ** 0.9
    return 1.0


class _NonFinite(Exception):
    pass


class _Stepper:
    """One optimizer step of a phase over the micro-batches: autocast, finite check, (scaled) backward, the
    gradient all-reduce, clipping, the step. Returns the loss terms averaged over the micro-batches."""

    def __init__(self, method: Method, cfg: Config, device: torch.device, hw: Resolved, info: distu.DistInfo,
                 generator: torch.Generator) -> None:
        self.cfg, self.device, self.hw, self.info, self.generator = cfg, device, hw, info, generator
        tc = cfg.train
        self.groups = method.parameter_groups()
        self.optimizers = {name: torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)
                           for name, params in self.groups.items()}
        # fp16: one gradient scaler per optimizer (phases step separately) so that small gradients do not underflow
        self.scalers = {name: torch.amp.GradScaler(device.type) for name in self.groups} if hw.grad_scaler else {}

    def set_lr(self, lr: float) -> None:
        for opt in self.optimizers.values():
            for g in opt.param_groups:
                g["lr"] = lr

    def __call__(self, phase: Phase, micro: list[dict[str, Any]], step: int) -> dict[str, float]:
        tc = self.cfg.train
        opt, params, scaler = self.optimizers[phase.group], self.groups[phase.group], self.scalers.get(phase.group)
        opt.zero_grad(set_to_none=True)
        terms: dict[str, float] = {}
        for b in micro:
            image = b["image"].to(self.device, non_blocking=True)
            mask = b["mask"].to(self.device, non_blocking=True)
            if self.hw.channels_last:
                image = image.contiguous(memory_format=torch.channels_last)
            with autocast(self.device, self.hw.precision):
                out = phase.loss(image, mask, step, self.generator)
            ok = torch.isfinite(out.total.detach()).float().reshape(1)  # on the device: nccl reduces CUDA tensors
            if distu.all_reduce_sum(ok).item() < self.info.world_size:
                raise _NonFinite(", ".join(f"{k}={float(v):.4g}" for k, v in out.terms.items()))
            loss = out.total / len(micro)
            (scaler.scale(loss) if scaler is not None else loss).backward()
            for k, v in out.terms.items():
                terms[k] = terms.get(k, 0.0) + float(v) / len(micro)
        distu.average_gradients(params, self.info.world_size)
        if scaler is not None:
            scaler.unscale_(opt)  # clip the true gradients; inf/nan ones make scaler.step skip the step
        if tc.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        return terms


def train(cfg: Config, run_dir: Optional[Path] = None, *, resume: bool = False, stop_after: Optional[int] = None,
          log: Callable[[str], None] = print) -> TrainResult:
    """Train the method described by ``cfg`` into ``run_dir`` (default ``output_dir/name``).

    Args:
        resume: continue exactly from ``run_dir/checkpoints/last`` (weights, optimizers, EMA, RNG, data order).
        stop_after: stop after this many optimizer steps in this invocation (saving ``last``), e.g. for
            time-sliced clusters; a later ``resume`` continues as if never interrupted.
    Raises:
        TrainingError: non-finite loss (``last`` is saved first, from the weights before the bad step).
        DataError: the dataset fails its checks (before any step).
        CheckpointError: a new run into a folder with checkpoints, or a resume without one.
    """
    t_start = time.time()
    info = distu.init_distributed()
    device = torch.device(f"cuda:{info.local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    tc = cfg.train
    seed = cfg.experiment.seed
    folder = RunFolder(Path(run_dir) if run_dir else Path(cfg.experiment.output_dir) / cfg.experiment.name,
                       info.is_main)

    # ---- seeds and data (checked up front: a bad dataset fails here, never mid-run) ----
    torch.manual_seed(seed)  # same initial weights on every rank (rank 0's are broadcast anyway)
    np.random.seed(seed + info.rank)
    random.seed(seed + info.rank)
    train_ds = build_dataset(cfg.data, cfg.data.train_split, train=True)
    val_ds = build_dataset(cfg.data, cfg.data.val_split, train=False) if tc.val_every > 0 else None
    if tc.calibrate and val_ds is None:  # the split train.calibrate fits on after the run: a missing or empty one
        # fails now, not after the training (the fit itself is diffmis.inference.calibrate_split's)
        build_dataset(cfg.data, cfg.data.val_split, train=False)

    # ---- method, optimizers, EMA, precision chosen for this device ----
    hw = resolve_for(tc.precision, tc.channels_last, device, cfg.data.spatial_dims)
    prefer_fast_kernels(device)
    method = build(cfg)
    method.check_geometry(cfg)  # a size the networks cannot take fails here, not at the first forward pass
    method = method.to(device)
    if hw.channels_last:
        method = method.to(memory_format=torch.channels_last)
    if not resume:
        method.setup_training(cfg, log if info.is_main else (lambda s: None))
    distu.broadcast_module(method)
    stepper = _Stepper(method, cfg, device, hw, info, torch.Generator(device=device).manual_seed(seed * 1009 + info.rank))
    ema_mod = method.ema_module()
    ema = EMA(ema_mod, tc.ema_decay) if (ema_mod is not None and tc.ema_decay) else None

    # ---- the run folder: a new run, or the exact state of the last checkpoint ----
    changes = folder.start(cfg, resume, log if info.is_main else (lambda s: None))
    pos = Position()
    state_kw = dict(optimizers=list(stepper.optimizers.values()), scalers=list(stepper.scalers.values()), ema=ema,
                    generator=stepper.generator)
    if resume:
        pos = folder.restore(method, cfg=cfg, device=device, **state_kw)
        if info.world_size > 1:  # per-rank RNG states are not kept; derive them from the step
            stepper.generator.manual_seed(seed * 1009 + info.rank + pos.step * 7)
    distu.barrier()
    metrics = folder.open_log(pos.step)
    if changes and info.is_main:
        log(f"resuming with changed settings: {', '.join(changes)}")
        metrics.write({"step": pos.step, "phase": "resume", "changed": changes})
    batches = Batches(train_ds, tc.batch_size, seed, info.rank, info.world_size, cfg.data.num_workers,
                      epoch=pos.epoch, batch_in_epoch=pos.batch_in_epoch, pin_memory=device.type == "cuda")
    if info.is_main:
        if hw.warning:
            log(f"warning: {hw.warning}")
        n_params = sum(p.numel() for p in method.parameters())
        log(f"diffmis train: recipe={cfg.experiment.recipe} model={cfg.model.name} params={n_params / 1e6:.2f}M "
            f"train={len(train_ds)} val={len(val_ds) if val_ds is not None else 0} world={info.world_size} "
            f"device={device.type} threads={torch.get_num_threads()} {hw.describe()} -> {folder.root}")
        if pos.step == 0:
            metrics.write({"step": 0, "phase": "setup", "device": device.type, "world_size": info.world_size,
                           "torch_threads": torch.get_num_threads(), **hw.record(),
                           "cpu": cpu_info().record() if device.type == "cpu" else None})

    def checkpoint(tag: str) -> None:
        pos.epoch, pos.batch_in_epoch = batches.epoch, batches.batch_in_epoch
        folder.save(tag, method, pos, cfg=cfg, resolved=hw, **state_kw)
        distu.barrier()

    def run_validation() -> dict[str, Any]:
        if val_ds is None:
            return {}
        with ema.applied() if (ema is not None and cfg.sample.use_ema) else contextlib.nullcontext():
            res = validate(method, val_ds, cfg, device, tc.val_max_batches, info, hw)
        if res:
            metrics.write({"step": pos.step, "phase": "val", "time": round(time.time() - t_start, 3), **res})
            if pos.best is None or res["dice"] > pos.best:
                pos.best = res["dice"]
                checkpoint("best")
        return res

    # ---- the loop ----
    method.train()
    progress = _progress(cfg, pos.step) if (info.is_main and tc.progress) else None
    window: dict[str, float] = {}
    window_n, window_imgs, window_t = 0, 0, time.time()
    total_imgs, loop_t0, start_step = 0, time.time(), pos.step
    stopped, last_val = "max_steps", {}
    signals = _SignalStop()
    try:
        while pos.step < tc.max_steps:
            time_share = 0.0
            if tc.max_minutes is not None:
                # every rank takes the largest elapsed time over the ranks: they stop at the same step and
                # decay the learning rate alike
                time_share = distu.all_reduce_max_float(time.time() - loop_t0, device) / (60.0 * tc.max_minutes)
                if time_share >= 1.0:
                    stopped = "max_minutes"
                    break
            if stop_after is not None and pos.step - start_step >= stop_after:
                stopped = "stop_after"
                break
            lr = tc.lr * lr_factor(pos.step, cfg, time_share)
            stepper.set_lr(lr)
            micro = [next(batches) for _ in range(tc.grad_accum)]
            for phase in method.phases(pos.step):
                for k, v in stepper(phase, micro, pos.step).items():
                    window[k] = window.get(k, 0.0) + v
                if phase.ema and ema is not None:
                    ema.update()
            distu.sync_buffers(method)  # BatchNorm statistics identical on every rank
            pos.step += 1
            n_img = tc.batch_size * tc.grad_accum * info.world_size
            window_imgs, total_imgs, window_n = window_imgs + n_img, total_imgs + n_img, window_n + 1

            if pos.step % tc.log_every == 0 or pos.step == tc.max_steps:
                dt = time.time() - window_t
                rec = {"step": pos.step, "phase": "train", "time": round(time.time() - t_start, 3), "lr": lr,
                       **{k: v / window_n for k, v in window.items()},
                       "images_per_s": window_imgs / dt if dt > 0 else None}
                rec["loss"] = sum(v for k, v in rec.items() if k in window)
                metrics.write(rec)
                if progress is not None:
                    progress.set_postfix(loss=f"{rec['loss']:.4f}", img_s=f"{rec['images_per_s']:.1f}")
                window, window_n, window_imgs, window_t = {}, 0, 0, time.time()
            if progress is not None:
                progress.update(1)
            if tc.val_every and pos.step % tc.val_every == 0 and pos.step < tc.max_steps:
                last_val = run_validation()
                if progress is not None and last_val:
                    progress.set_postfix(val_dice=f"{last_val['dice']:.3f}")
            if tc.ckpt_every and pos.step % tc.ckpt_every == 0:
                checkpoint("last")
        if stopped != "stop_after" and val_ds is not None:
            last_val = run_validation() or last_val
        checkpoint("last")
    except _NonFinite as err:
        checkpoint("last")
        raise TrainingError(f"non-finite loss at step {pos.step} ({err}); saved the weights before this step to "
                            f"{folder.checkpoints / 'last'}; lower train.lr or use precision=fp32") from None
    except KeyboardInterrupt:
        if info.is_main:
            log(f"\ninterrupted at step {pos.step}: saving {folder.checkpoints / 'last'}")
        checkpoint("last")
        raise
    except _Signalled as sig:
        import signal

        name = signal.Signals(sig.signum).name
        if info.is_main:
            log(f"\n{name} at step {pos.step}: saving {folder.checkpoints / 'last'}")
        checkpoint("last")
        raise TrainingStopped(f"stopped by {name} at step {pos.step}; saved {folder.checkpoints / 'last'}; "
                              f"--resume continues", sig.signum) from None
    finally:
        signals.restore()
        if progress is not None:
            progress.close()
        folder.close()
    elapsed = time.time() - loop_t0
    return TrainResult(run_dir=folder.root, step=pos.step, stopped=stopped, best_dice=pos.best, last_val=last_val,
                       images_per_s=total_imgs / elapsed if elapsed > 0 and total_imgs else None,
                       seconds=time.time() - t_start, method=method)


def _progress(cfg: Config, initial: int) -> Any:
    from tqdm import tqdm

    budget = cfg.train.max_minutes is not None
    # a time budget ends the run, not max_steps: show the minutes instead of an ETA to max_steps
    return tqdm(total=None if budget else cfg.train.max_steps, initial=initial, unit="step", dynamic_ncols=True,
                desc=f"train {cfg.experiment.recipe}" + (f" ({cfg.train.max_minutes:g} min budget)" if budget else ""))
