"""CUDA: autocast dtypes, the fp16 gradient scaler, bit-exact resume with deterministic algorithms, prediction
equal to the CPU's, CUDA-graph replay equal to eager calls. Skipped without a GPU; ``benchmarks/gpu.py`` runs
them on the lent GPU (``pytest -m cuda``)."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

# cuBLAS is deterministic only with a fixed workspace; read when its first handle is made, so set before any test
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from _tiny import RECIPES, tiny_config  # noqa: E402
from diffmis.config import config_from_dict  # noqa: E402
from diffmis.hardware import Resolved, resolve_for  # noqa: E402
from diffmis.inference import Predictor  # noqa: E402
from diffmis.methods import LossOutput, Method, Phase  # noqa: E402
from diffmis.training.trainer import _Stepper, train  # noqa: E402
from diffmis.training import distributed as distu  # noqa: E402
from diffmis.utils import autocast  # noqa: E402

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (benchmarks/gpu.py)")]
CUDA = torch.device("cuda")


@pytest.fixture
def exact_fp32():
    """fp32 without TF32 (cuDNN convolutions use TF32 by default), restored afterwards."""
    conv, mm = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = conv, mm


@pytest.fixture
def deterministic():
    torch.use_deterministic_algorithms(True, warn_only=True)
    bench = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield caught
    torch.use_deterministic_algorithms(False)
    torch.backends.cudnn.benchmark = bench


def test_autocast_dtypes_on_cuda():
    conv = torch.nn.Conv2d(3, 4, 3, padding=1).to(CUDA)
    x = torch.randn(2, 3, 8, 8, device=CUDA)
    for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        with autocast(CUDA, precision):
            assert conv(x).dtype == dtype, precision
    res = resolve_for("auto", "auto", CUDA)
    if torch.cuda.get_device_capability()[0] >= 8:  # Ampere and later: bf16, no scaler
        assert (res.precision, res.grad_scaler) == ("bf16", False)
    else:
        assert (res.precision, res.grad_scaler) == ("fp16", True)
    assert resolve_for("fp16", "auto", CUDA).grad_scaler


class _Tiny(Method):
    """One linear layer whose gradient, in fp16, underflows to zero without loss scaling."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def loss(self, image, mask, step=0, generator=None) -> LossOutput:
        y = self.lin(image.flatten(1)[:, :4])  # fp16 under autocast
        total = (y * 1e-8).float().sum()  # d total / d y = 1e-8: below fp16's smallest subnormal (6e-8)
        return LossOutput(total, {"tiny": total.detach()})


def test_fp16_gradient_scaler_keeps_gradients_that_would_underflow():
    cfg = config_from_dict(tiny_config("segmentor", Path("/tmp"), precision="fp16", grad_clip=None, weight_decay=0.0))
    moved = {}
    for scaler in (False, True):
        torch.manual_seed(0)
        m = _Tiny().to(CUDA)
        hw = Resolved(precision="fp16", channels_last=False, grad_scaler=scaler, reason="test")
        stepper = _Stepper(m, cfg, CUDA, hw, distu.DistInfo(), torch.Generator(device=CUDA))
        before = m.lin.weight.detach().clone()
        batch = {"image": torch.randn(2, 1, 4, 4), "mask": torch.zeros(2, 1, 4, 4)}
        for step in range(3):  # the scaler's first scale, 2^16, overflows this fp16 graph: it halves and retries
            stepper(Phase("main", m.loss), [batch], step)
        moved[scaler] = float((m.lin.weight.detach() - before).abs().max())
    assert moved[False] == 0.0  # the fp16 gradient underflowed: AdamW saw zeros
    assert moved[True] > 1e-5  # scaled, it survived: the steps moved the weights by about lr


def test_fp16_run_trains_and_checkpoints_its_scaler(tmp_path):
    cfg = config_from_dict(tiny_config("medsegdiff", tmp_path, steps=4, precision="fp16"))
    res = train(cfg, tmp_path / "run")
    assert res.step == 4
    ck = tmp_path / "run" / "checkpoints" / "last"
    assert all(torch.isfinite(v).all() for v in load_file(str(ck / "model.safetensors")).values())
    state = json.loads((ck / "state.json").read_text())
    scalers = state["grad_scalers"]
    assert len(scalers) == 1 and scalers[0]["scale"] > 0  # one per optimizer, saved for an exact resume
    assert state["resolved"]["grad_scaler"] is True


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_resume_is_bit_identical_on_cuda(recipe, tmp_path, deterministic):
    cfg = config_from_dict(tiny_config(recipe, tmp_path, steps=4, val_every=2))
    train(cfg, tmp_path / "full")
    train(cfg, tmp_path / "part", stop_after=2)
    train(cfg, tmp_path / "part", resume=True)
    nondet = sorted({str(w.message)[:160] for w in deterministic if "deterministic" in str(w.message)})
    for name in ("model", "optimizer"):
        a = load_file(str(tmp_path / "full" / "checkpoints" / "last" / f"{name}.safetensors"))
        b = load_file(str(tmp_path / "part" / "checkpoints" / "last" / f"{name}.safetensors"))
        for k in a:
            assert torch.equal(a[k], b[k]), f"{recipe}: {name} tensor {k} differs after resume; {nondet}"


def _run(recipe: str, tmp: Path) -> Path:
    cfg = config_from_dict(tiny_config(recipe, tmp, steps=3))
    return train(cfg, tmp / recipe).run_dir


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_prediction_on_cuda_matches_the_cpu(recipe, tmp_path, exact_fp32):
    run = _run(recipe, tmp_path)
    rng = np.random.default_rng(0)
    images = [rng.random((1, 32, 32)).astype(np.float32) for _ in range(3)]
    out = {}
    for dev in ("cpu", "cuda"):
        pred = Predictor.from_run(run, device=dev, precision="fp32", ensemble=2)
        out[dev] = pred.predict_batch(images)
    for a, b in zip(out["cpu"], out["cuda"]):
        diff = np.abs(a.probability - b.probability)
        assert diff.mean() < 1e-3 and (a.label == b.label).mean() >= 0.99, (recipe, diff.max())
        if RECIPES[recipe]["diffusion"]["kind"] != "bernoulli":  # no draw that a rounding difference could flip
            assert diff.max() < 1e-3, (recipe, diff.max())


@pytest.mark.parametrize("recipe", ["medsegdiff", "berdiff", "pd_ddpm"])
def test_cuda_graph_replay_equals_eager_calls(recipe, tmp_path, exact_fp32):
    run = _run(recipe, tmp_path)
    rng = np.random.default_rng(1)
    images = [rng.random((1, 32, 32)).astype(np.float32) for _ in range(4)]
    eager = Predictor.from_run(run, device="cuda", precision="fp32", ensemble=3, cuda_graphs=False)
    graphed = Predictor.from_run(run, device="cuda", precision="fp32", ensemble=3)
    assert eager.graphs is None and graphed.graphs is not None
    for _ in range(2):  # the second pass replays the graphs captured by the first
        for a, b in zip(eager.predict_batch(images), graphed.predict_batch(images)):
            assert np.abs(a.probability - b.probability).max() < 1e-4
    st = graphed.graphs.stats()
    assert st["errors"] == [] and st["captures"] >= 1 and st["replays"] >= 2 * graphed.steps - 1, st


def test_bf16_training_on_cuda_learns(tmp_path):
    """A segmentor under bf16 autocast (what precision auto picks on this GPU) lowers its loss."""
    cfg = config_from_dict(tiny_config("segmentor", tmp_path, steps=100, precision="auto", log_every=1))
    res = train(cfg, tmp_path / "run")
    lines = [json.loads(s) for s in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    setup = next(r for r in lines if r["phase"] == "setup")
    assert setup["device"] == "cuda" and setup["precision"] == resolve_for("auto", "auto", CUDA).precision
    loss = [r["loss"] for r in lines if r["phase"] == "train"]
    assert np.mean(loss[-10:]) < 0.9 * np.mean(loss[:10])  # 0.77 in a bf16 run on a CPU


def test_training_collectives_run_on_nccl(tmp_path, monkeypatch):
    """The trainer's collectives (finite-loss vote, weight broadcast, validation gather) on an nccl group: a
    group of one process, the most one GPU allows (nccl refuses two ranks on one device)."""
    import torch.distributed as dist

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29533")
    dist.init_process_group("nccl", rank=0, world_size=1)
    try:
        cfg = config_from_dict(tiny_config("hidiff", tmp_path, steps=2, val_every=1))
        res = train(cfg, tmp_path / "run")
        assert res.step == 2 and res.best_dice is not None
    finally:
        dist.destroy_process_group()
