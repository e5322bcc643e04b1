"""The training loop: ``train(cfg)`` turns a config into a run folder. Read it top to bottom.

Run folder (written by rank 0 only)::

    RUN/config.yaml            resolved config (reloads identically)
    RUN/metrics.jsonl          one JSON object per line: train lines (loss terms, lr, images/s), val lines (Dice)
    RUN/tensorboard/           the same scalars for TensorBoard
    RUN/checkpoints/last/      see ``checkpoint.py``; ``best/`` holds the best validation Dice

Distributed: launched by torchrun, every rank builds the same model (rank 0's weights are broadcast), reads its
own shard of each epoch's permutation and averages gradients with one all-reduce per optimizer step and
network (the arithmetic of DDP; done by hand because HiDiff's alternate step runs each network several
times per iteration). Seeds are ``seed + rank``.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from diffmis.config import Config, dump_config, load_config
from diffmis.data import build_dataset
from diffmis.diffusion import GaussianMethod, HiDiffMethod, SegmentationMethod, build
from diffmis.errors import CheckpointError, ConfigError, DiffmisError
from diffmis.hardware import Resolved, cpu_info, resolve_for
from diffmis.metrics import dice_batch
from diffmis.training import distributed as distu
from diffmis.training.checkpoint import load_checkpoint, load_weights_into, read_state, save_checkpoint
from diffmis.training.ema import EMA
from diffmis.utils import autocast

__all__ = ["train", "TrainResult", "TrainingError", "hard_onehot", "resolve_run_config"]


class TrainingError(DiffmisError):
    """Training stopped (non-finite loss, bad dataset, ...); the message says why and what was saved."""


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
    method: Optional[nn.Module] = None


def hard_onehot(probs: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """(B, K, H, W) probabilities -> one-hot hard mask: threshold for K = 1, argmax for K > 1."""
    if probs.shape[1] == 1:
        return (probs > threshold).float()
    return torch.nn.functional.one_hot(probs.argmax(1), probs.shape[1]).permute(0, 3, 1, 2).float()


def _lr_factor(step: int, cfg: Config) -> float:
    tc = cfg.train
    if tc.warmup_steps and step < tc.warmup_steps:
        return (step + 1) / tc.warmup_steps
    total = max(1, tc.max_steps - tc.warmup_steps)
    k = min(max(0, step - tc.warmup_steps), total)
    if tc.lr_schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * k / total))
    if tc.lr_schedule == "poly":  # HiDiff: lr_k = lr_0 (1 - k / K)^0.9
        return (1.0 - k / total) ** 0.9
    return 1.0


# ------------------------------------------------------------------------------------------------------------
# data order: a permutation per epoch from (seed, epoch), sharded over ranks, resumable mid-epoch
# ------------------------------------------------------------------------------------------------------------


class _SeededItems(torch.utils.data.Dataset):
    """Each item is drawn with RNGs seeded from (seed, epoch, index), so augmentation is reproducible and an
    interrupted epoch resumes with the same augmented samples. The caller's RNG states are restored."""

    def __init__(self, base: torch.utils.data.Dataset, seed: int, epoch: int) -> None:
        self.base, self.seed, self.epoch = base, seed, epoch

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> Any:
        s = (self.seed * 1_000_003 + self.epoch * 10_007 + int(i)) % (2**31)
        np_state, py_state = np.random.get_state(), random.getstate()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(s)
            np.random.seed(s)
            random.seed(s)
            if hasattr(self.base, "set_item_seed"):
                self.base.set_item_seed(s)
            try:
                return self.base[i]
            finally:
                np.random.set_state(np_state)
                random.setstate(py_state)


def _epoch_batches(n: int, batch: int, seed: int, epoch: int, rank: int, world: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed * 7919 + epoch)
    order = torch.randperm(n, generator=g).tolist()
    per_rank = n // world
    mine = order[rank * per_rank:(rank + 1) * per_rank]
    nb = len(mine) // batch
    return [mine[j * batch:(j + 1) * batch] for j in range(nb)]


def _collate(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in items[0]:
        vals = [it[key] for it in items]
        out[key] = torch.stack([torch.as_tensor(v) for v in vals]) if isinstance(vals[0], (torch.Tensor, np.ndarray)) else vals
    return out


class _Batches:
    """Infinite iterator of training batches with its position (epoch, batch index) for checkpoints."""

    def __init__(self, ds, batch: int, seed: int, rank: int, world: int, workers: int,
                 epoch: int = 0, batch_in_epoch: int = 0) -> None:
        self.ds, self.batch, self.seed, self.rank, self.world, self.workers = ds, batch, seed, rank, world, workers
        self.epoch, self.batch_in_epoch = epoch, batch_in_epoch
        if len(ds) // world < batch:
            raise TrainingError(f"the training split has {len(ds)} samples: fewer than batch_size={batch} per rank "
                                f"(x {world} ranks); lower train.batch_size")
        self._it: Optional[Iterator] = None

    def _start_epoch(self) -> None:
        batches = _epoch_batches(len(self.ds), self.batch, self.seed, self.epoch, self.rank, self.world)
        batches = batches[self.batch_in_epoch:]
        loader = torch.utils.data.DataLoader(
            _SeededItems(self.ds, self.seed, self.epoch), batch_sampler=batches, num_workers=self.workers,
            collate_fn=_collate, persistent_workers=False)
        self._it = iter(loader)

    def __next__(self) -> dict[str, Any]:
        while True:
            if self._it is None:
                self._start_epoch()
            try:
                b = next(self._it)  # type: ignore[arg-type]
                self.batch_in_epoch += 1
                return b
            except StopIteration:
                self._it = None
                self.epoch += 1
                self.batch_in_epoch = 0


# ------------------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------------------


def _average_gradients(params: Sequence[nn.Parameter], world: int) -> None:
    """Mean of the gradients over ranks, one flattened all-reduce (DDP's arithmetic)."""
    grads = [p.grad for p in params if p.grad is not None]
    if world <= 1 or not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= world
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset:offset + n].view_as(g))
        offset += n


def _broadcast_module(module: nn.Module) -> None:
    if dist.is_initialized():
        for t in module.state_dict().values():
            dist.broadcast(t, src=0)


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


def _trainable(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


class _Logger:
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
                if isinstance(v, (int, float)) and k not in ("step",):
                    self.tb.add_scalar(f"{phase}/{k}", v, record["step"])

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.tb is not None:
            self.tb.close()


@torch.no_grad()
def validate(method: SegmentationMethod, ds, cfg: Config, device: torch.device, max_batches: Optional[int],
             info: distu.DistInfo, run: Optional[Resolved] = None) -> dict[str, Any]:
    """Mean foreground Dice on ``ds`` with the config's sampler (a fixed generator: comparable across steps).

    At most ``max_batches * sample.batch_size`` images. Patch-trained runs (``data.patch_size``) predict each whole
    image with sliding windows of the patch size (overlap 0.25, Gaussian blending), as ``diffmis predict`` does."""
    run = run or resolve_for(cfg.train.precision, cfg.train.channels_last, device)
    method.eval()
    gen = torch.Generator(device=device).manual_seed(cfg.experiment.seed + 12345)
    n = len(ds)
    idx = list(range(info.rank, n, info.world_size))
    bs = cfg.sample.batch_size
    scores: list[list[float]] = []
    nfe = 0
    inferer = None
    if cfg.data.patch_size:  # patch-trained runs see whole images here: one image at a time, windows batched
        from diffmis.inference import sliding_window_inferer  # (imported here: inference imports training)

        inferer = sliding_window_inferer(cfg.data.patch_size, bs, padding_mode="reflect")
    per_batch = 1 if inferer is not None else bs
    limit = None if max_batches is None else max_batches * bs
    idx = idx if limit is None else idx[:limit]
    calls = [0]

    def sample_probs(image: torch.Tensor) -> torch.Tensor:
        out = method.sample(image, steps=cfg.sample.steps, sampler=cfg.sample.sampler, eta=cfg.sample.eta,
                            generator=gen)
        calls[0] += out.nfe
        return out.probs.float()

    for start in range(0, len(idx), per_batch):
        batch = _collate([ds[i] for i in idx[start:start + per_batch]])
        image = batch["image"].to(device)
        mask = batch["mask"].to(device)
        if run.channels_last:
            image = image.contiguous(memory_format=torch.channels_last)
        calls[0] = 0
        with autocast(device, run.precision):
            if inferer is not None:
                probs = inferer(image, sample_probs)
            else:
                probs = sample_probs(image)
        nfe = calls[0]
        pred = hard_onehot(probs.float(), cfg.sample.threshold)
        d = dice_batch(pred, mask)  # (B, K)
        if d.shape[1] > 1:
            d = d[:, 1:]  # foreground classes
        scores.extend(d.tolist())
    gathered = [s for part in distu.all_gather_objects(scores) for s in part]
    method.train()
    if not gathered:
        return {}
    arr = np.array(gathered, dtype=np.float64)
    return {"dice": float(np.nanmean(arr)), "dice_per_class": np.nanmean(arr, axis=0).tolist(),
            "n_cases": len(gathered), "nfe": nfe}


def _load_prior_run(method: GaussianMethod, prior_run: str) -> None:
    """PD-DDPM: take the pre-segmentation net from an existing ``segmentor`` run (best, else last)."""
    run = Path(prior_run)
    ck = run / "checkpoints" / ("best" if (run / "checkpoints" / "best").is_dir() else "last")
    state = read_state(ck)
    recipe = ((state.get("config") or {}).get("experiment") or {}).get("recipe")
    if recipe not in ("segmentor", None):
        raise CheckpointError(f"train.prior_run {run} is a '{recipe}' run; PD-DDPM needs a 'segmentor' run")
    from safetensors.torch import load_file

    tensors = load_file(str(ck / "model.safetensors"))
    sub = {k[len("segmentor."):]: v for k, v in tensors.items() if k.startswith("segmentor.")}
    assert method.prior is not None
    load_weights_into(method.prior, sub, str(ck))


# ------------------------------------------------------------------------------------------------------------
# the loop
# ------------------------------------------------------------------------------------------------------------


def train(cfg: Config, run_dir: Optional[Path] = None, *, resume: bool = False, stop_after: Optional[int] = None,
          log: Callable[[str], None] = print) -> TrainResult:
    """Train the method described by ``cfg`` into ``run_dir``.

    Args:
        resume: continue exactly from ``run_dir/checkpoints/last`` (weights, optimizers, EMA, RNG, data order).
        stop_after: stop after this many optimizer steps in this invocation (saving ``last``), e.g. for
            time-sliced clusters; a later ``resume`` continues as if never interrupted.
    Raises:
        TrainingError: non-finite loss (``last`` is saved first, from the weights before the bad step).
        DataError: the dataset fails its checks (before any step).
    """
    info = distu.init_distributed()
    device = torch.device(f"cuda:{info.local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    run_dir = Path(run_dir) if run_dir else Path(cfg.experiment.output_dir) / cfg.experiment.name
    tc = cfg.train
    t_start = time.time()

    # ---- seeds, data (checked up front: a bad dataset fails here, never mid-run) ----
    seed = cfg.experiment.seed
    torch.manual_seed(seed)  # same initial weights on every rank (rank 0's are broadcast anyway)
    np.random.seed(seed + info.rank)
    random.seed(seed + info.rank)
    train_ds = build_dataset(cfg.data, cfg.data.train_split, train=True)
    val_ds = None
    if tc.val_every > 0:
        val_ds = build_dataset(cfg.data, cfg.data.val_split, train=False)

    # ---- model, optimizers, EMA ----
    run = resolve_for(tc.precision, tc.channels_last, device)
    method = build(cfg).to(device)
    if run.channels_last:
        method = method.to(memory_format=torch.channels_last)
    if isinstance(method, GaussianMethod) and method.prior is not None and tc.prior_run:
        _load_prior_run(method, tc.prior_run)
    _broadcast_module(method)
    hidiff = isinstance(method, HiDiffMethod)
    groups: list[list[nn.Parameter]]
    if hidiff:
        groups = [_trainable(method.segmentor), _trainable(method.refiner)]
    else:
        groups = [_trainable(method)]
    optimizers = [torch.optim.AdamW(g, lr=tc.lr, weight_decay=tc.weight_decay) for g in groups]
    # fp16: one gradient scaler per optimizer (HiDiff's two phases step separately), so small gradients do not
    # underflow; bf16 and fp32 need none
    scalers = [torch.amp.GradScaler(device.type) for _ in optimizers] if run.grad_scaler else []
    ema_mod = method.ema_module()
    ema = EMA(ema_mod, tc.ema_decay) if (ema_mod is not None and tc.ema_decay) else None
    gen = torch.Generator(device=device).manual_seed(seed * 1009 + info.rank)

    step, epoch, bie, best = 0, 0, 0, None
    if resume:
        ck = run_dir / "checkpoints" / "last"
        if not ck.is_dir():
            raise CheckpointError(f"cannot resume: no checkpoint at {ck}")
        state = load_checkpoint(ck, method, optimizers=optimizers, generator=gen, restore_rng_state=True,
                                expect={"recipe": cfg.experiment.recipe, "model": cfg.model.name})
        step, epoch, bie = state["step"], state["epoch"], state["batch_in_epoch"]
        for scaler, sd in zip(scalers, state.get("grad_scalers") or []):
            scaler.load_state_dict(sd)
        best = state.get("best_dice")
        if ema is not None and "ema_shadow" in state:
            ema.shadow = {k: v.to(device) for k, v in state["ema_shadow"].items()}
            ema.num_updates = state.get("ema_updates", 0)
        if info.world_size > 1:  # per-rank RNG states are not kept; derive them from the step
            gen.manual_seed(seed * 1009 + info.rank + step * 7)
    elif (run_dir / "checkpoints").exists():
        raise CheckpointError(f"run folder {run_dir} already has checkpoints; use --resume or another --out")
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, run_dir / "config.yaml")
    distu.barrier()

    batches = _Batches(train_ds, tc.batch_size, seed, info.rank, info.world_size, cfg.data.num_workers,
                       epoch=epoch, batch_in_epoch=bie)
    logger = _Logger(run_dir, info.is_main)
    n_params = sum(p.numel() for p in method.parameters())
    if info.is_main:
        if run.warning:
            log(f"warning: {run.warning}")
        log(f"diffmis train: recipe={cfg.experiment.recipe} model={cfg.model.name} params={n_params / 1e6:.2f}M "
            f"train={len(train_ds)} val={len(val_ds) if val_ds is not None else 0} world={info.world_size} "
            f"device={device.type} threads={torch.get_num_threads()} {run.describe()} -> {run_dir}")
        if not resume or step == 0:
            logger.write({"step": step, "phase": "setup", "device": device.type, "world_size": info.world_size,
                          "torch_threads": torch.get_num_threads(), **run.record(),
                          "cpu": cpu_info().record() if device.type == "cpu" else None})

    def checkpoint(tag: str) -> None:
        if info.is_main:
            save_checkpoint(run_dir / "checkpoints" / tag, method, step=step, epoch=batches.epoch,
                            batch_in_epoch=batches.batch_in_epoch, optimizers=optimizers,
                            ema_shadow=ema.shadow if ema else None, ema_updates=ema.num_updates if ema else 0,
                            generator=gen, config=cfg.to_dict(),
                            extra={"best_dice": best, "recipe": cfg.experiment.recipe, "resolved": run.record(),
                                   "grad_scalers": [sc.state_dict() for sc in scalers]})
        distu.barrier()

    def run_validation() -> dict[str, Any]:
        nonlocal best
        if val_ds is None:
            return {}
        ctx = ema.applied() if (ema is not None and cfg.sample.use_ema) else contextlib.nullcontext()
        with ctx:
            res = validate(method, val_ds, cfg, device, tc.val_max_batches, info, run)
        if not res:
            return res
        logger.write({"step": step, "phase": "val", "time": round(time.time() - t_start, 3), **res})
        if best is None or res["dice"] > best:
            best = res["dice"]
            checkpoint("best")
        return res

    # ---- the loop ----
    method.train()
    progress = None
    if info.is_main and tc.progress:
        from tqdm import tqdm

        budget = tc.max_minutes is not None
        # a time budget ends the run, not max_steps: show the minutes instead of an ETA to max_steps
        progress = tqdm(total=None if budget else tc.max_steps, initial=step, unit="step", dynamic_ncols=True,
                        desc=f"train {cfg.experiment.recipe}" + (f" ({tc.max_minutes:g} min budget)" if budget else ""))
    window: dict[str, float] = {}
    window_n, window_imgs, window_t = 0, 0, time.time()
    total_imgs, loop_t0, start_step = 0, time.time(), step
    stopped = "max_steps"
    last_val: dict[str, Any] = {}
    try:
        while step < tc.max_steps:
            if tc.max_minutes is not None and (time.time() - loop_t0) / 60.0 >= tc.max_minutes:
                stopped = "max_minutes"
                break
            if stop_after is not None and step - start_step >= stop_after:
                stopped = "stop_after"
                break
            lr = tc.lr * _lr_factor(step, cfg)
            for opt in optimizers:
                for g in opt.param_groups:
                    g["lr"] = lr
            micro = [next(batches) for _ in range(tc.grad_accum)]
            terms_sum: dict[str, float] = {}

            def run_phase(loss_fn, idx: int) -> None:
                opt, params = optimizers[idx], groups[idx]
                scaler = scalers[idx] if scalers else None
                opt.zero_grad(set_to_none=True)
                for b in micro:
                    image = b["image"].to(device, non_blocking=True)
                    mask = b["mask"].to(device, non_blocking=True)
                    if run.channels_last:
                        image = image.contiguous(memory_format=torch.channels_last)
                    with autocast(device, run.precision):
                        out = loss_fn(image, mask, step, gen)
                    ok = torch.tensor([float(torch.isfinite(out.total).item())])
                    if distu.all_reduce_sum(ok).item() < info.world_size:
                        raise _NonFinite(", ".join(f"{k}={float(v):.4g}" for k, v in out.terms.items()))
                    loss = out.total / tc.grad_accum
                    (scaler.scale(loss) if scaler is not None else loss).backward()
                    for k, v in out.terms.items():
                        terms_sum[k] = terms_sum.get(k, 0.0) + float(v) / tc.grad_accum
                _average_gradients(params, info.world_size)
                if scaler is not None:
                    scaler.unscale_(opt)  # clip the true gradients; inf/nan ones make scaler.step skip the step
                if tc.grad_clip:
                    torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
                if scaler is not None:
                    scaler.step(opt)
                    scaler.update()
                else:
                    opt.step()

            if hidiff:
                assert isinstance(method, HiDiffMethod)
                if step >= tc.pretrain_steps:  # METHODS 5.5 step 1: refiner on the detached prior
                    run_phase(method.refiner_loss, 1)
                    if ema is not None:
                        ema.update()
                with_bbdm = step >= tc.pretrain_steps
                run_phase(lambda i, m, s, g: method.segmentor_loss(i, m, s, g, with_bbdm=with_bbdm),
                          0)  # step 2: L_S + w_diff * L_BBDM
            else:
                run_phase(method.loss, 0)
                if ema is not None:
                    ema.update()
            if info.world_size > 1:  # keep buffers (BatchNorm statistics) identical across ranks
                for buf in method.buffers():
                    dist.broadcast(buf, src=0)
            step += 1
            n_img = tc.batch_size * tc.grad_accum * info.world_size
            window_imgs += n_img
            total_imgs += n_img
            window_n += 1
            for k, v in terms_sum.items():
                window[k] = window.get(k, 0.0) + v
            if step % tc.log_every == 0 or step == tc.max_steps:
                dt = time.time() - window_t
                rec = {"step": step, "phase": "train", "time": round(time.time() - t_start, 3), "lr": lr,
                       **{k: v / window_n for k, v in window.items()},
                       "images_per_s": window_imgs / dt if dt > 0 else None}
                rec["loss"] = sum(v for k, v in rec.items() if k in window)
                logger.write(rec)
                if progress is not None:
                    progress.set_postfix(loss=f"{rec['loss']:.4f}", img_s=f"{rec['images_per_s']:.1f}")
                window, window_n, window_imgs, window_t = {}, 0, 0, time.time()
            if progress is not None:
                progress.update(1)
            if tc.val_every and step % tc.val_every == 0 and step < tc.max_steps:
                last_val = run_validation()
                if progress is not None and last_val:
                    progress.set_postfix(val_dice=f"{last_val['dice']:.3f}")
            if tc.ckpt_every and step % tc.ckpt_every == 0:
                checkpoint("last")
        if stopped != "stop_after" and val_ds is not None:
            last_val = run_validation() or last_val
        checkpoint("last")
    except _NonFinite as err:
        checkpoint("last")
        raise TrainingError(f"non-finite loss at step {step} ({err}); saved the weights before this step to "
                            f"{run_dir / 'checkpoints' / 'last'}; lower train.lr or use precision=fp32") from None
    except KeyboardInterrupt:
        if info.is_main:
            log(f"\ninterrupted at step {step}: saving {run_dir / 'checkpoints' / 'last'}")
        checkpoint("last")
        raise
    finally:
        if progress is not None:
            progress.close()
        logger.close()
    elapsed = time.time() - loop_t0
    return TrainResult(run_dir=run_dir, step=step, stopped=stopped, best_dice=best, last_val=last_val,
                       images_per_s=total_imgs / elapsed if elapsed > 0 and total_imgs else None,
                       seconds=time.time() - t_start, method=method)


class _NonFinite(Exception):
    pass
