"""HTML report: self-contained, all sections, robust to a bare run folder; screenshot through headless Chromium."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffmis.cli.main import main
from diffmis.errors import InputError
from diffmis.evaluation import evaluate_folders
from diffmis.report import write_report

ROOT = Path(__file__).resolve().parents[1]
SIZE = 48


def disc(cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[:SIZE, :SIZE]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2


def save_png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def write_bare_run(run: Path) -> None:
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(
        "experiment:\n  name: toy_hidiff\n  recipe: hidiff\nmodel:\n  name: bbdm\ntrain:\n  max_steps: 40\n"
    )
    lines = [{"step": 0, "phase": "setup", "device": "cpu", "precision": "fp32", "channels_last": False,
              "grad_scaler": False, "reason": "auto: CPU has no native bf16 (AVX2)", "torch_threads": 2,
              "cpu": {"model": "Test CPU", "flags": ["avx2"]}}]
    for step in range(10, 50, 10):
        lines.append({"step": step, "phase": "train", "time": step * 0.5, "lr": 1e-3, "loss": 1.0 / step,
                      "seg": 0.6 / step, "diff": 0.4 / step, "images_per_s": 30.0})
        lines.append({"step": step, "phase": "val", "time": step * 0.5 + 0.1, "dice": 0.5 + step / 100,
                      "dice_per_class": [0.4 + step / 100, 0.6 + step / 100]})
    text = "\n".join(json.dumps(r) for r in lines)
    (run / "metrics.jsonl").write_text(text + '\n{"step": 50, "phase": "train"}\nnot json\n')


@pytest.fixture(scope="module")
def fake_run(tmp_path_factory) -> Path:
    """A run with curves, two eval sets written by evaluate_folders (images, uncertainty), and nfe.json."""
    tmp = tmp_path_factory.mktemp("report")
    run = tmp / "run"
    write_bare_run(run)
    rng = np.random.default_rng(0)
    for i in range(5):
        cid = f"case{i}"
        truth = disc(24, 24, 8 + i)
        image = (60 + 120 * truth + rng.normal(0, 15, (SIZE, SIZE))).clip(0, 255).astype(np.uint8)
        save_png(tmp / "images" / f"{cid}.png", np.stack([image] * 3, -1))
        save_png(tmp / "ref" / f"{cid}.png", (truth * 255).astype(np.uint8))
        save_png(tmp / "pred" / "segmentor" / f"{cid}.png", (disc(24 + i, 24, 8) * 255).astype(np.uint8))
        hidiff = disc(24 + i / 2, 24, 8 + i)
        save_png(tmp / "pred" / "hidiff" / f"{cid}.png", (hidiff * 255).astype(np.uint8))
        edge = np.abs(hidiff.astype(float) - truth.astype(float))
        (tmp / "unc").mkdir(exist_ok=True)
        np.save(tmp / "unc" / f"{cid}.npy", (0.25 * edge + 0.02 * rng.random((SIZE, SIZE))).astype(np.float32))
    for name in ("hidiff", "segmentor"):
        evaluate_folders(tmp / "pred" / name, tmp / "ref", images_dir=tmp / "images",
                         uncertainty_dir=tmp / "unc" if name == "hidiff" else None, out_dir=run / "eval" / name)
    nfe = [{"method": m, "sampler": "ddim", "steps": s, "nfe": s * (2 if m == "medsegdiff" else 1),
            "dice": 0.6 + 0.02 * s} for m in ("hidiff", "medsegdiff") for s in (1, 5, 10)]
    (run / "nfe.json").write_text(json.dumps(nfe))
    return run


def assert_self_contained(text: str) -> None:
    assert "http://" not in text and "https://" not in text
    assert "<link" not in text and "<script" not in text
    for src in re.findall(r'src="([^"]*)"', text):
        assert src.startswith("data:image/png;base64,"), src[:80]


@pytest.fixture(scope="module")
def full_html(fake_run, tmp_path_factory) -> Path:
    """The report of the fake run, written once through the CLI (``diffmis report --run RUN --out FILE``)."""
    out = tmp_path_factory.mktemp("html") / "report.html"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DIFFMIS_NO_MALLOC_TUNING", "1")
        assert main(["report", "--run", str(fake_run), "--out", str(out)]) == 0
    return out


def test_full_report(full_html):
    text = full_html.read_text()
    assert_self_contained(text)
    assert "diffmis report: toy_hidiff" in text
    # the precision the training machine resolved (metrics.jsonl setup line), next to the config's request
    assert "fp32 (auto: CPU has no native bf16 (AVX2)), channels_last=false, 2 thread(s), Test CPU" in text
    for heading in ("Configuration", "Training curves", "Metrics", "Cases: best, median, worst",
                    "Dice against network evaluations"):
        assert f"<h2>{heading}" in text
    assert text.count('src="data:image/png;base64,') == 1 + 3 + 1  # curves, 3 cases, NFE
    # both eval sets side by side, hidiff first (alphabetical), best/median/worst picked from it
    assert re.search(r"<th[^>]*>hidiff</th><th[^>]*>segmentor</th>", text)
    assert "best (Dice 1.000): case0" in text and "worst" in text and "median" in text
    assert "1 unreadable line(s) skipped" in text
    assert "class missing" not in text


def test_bare_run_says_what_is_missing(tmp_path):
    run = tmp_path / "bare"
    write_bare_run(run)
    text = write_report(run).read_text()
    assert (run / "report.html").is_file()
    assert_self_contained(text)
    assert "no evaluation summaries" in text and "no nfe.json" in text
    assert text.count("data:image/png;base64,") == 1  # the training curves


def test_missing_run_folder(tmp_path, monkeypatch, capsys):
    with pytest.raises(InputError, match="run folder not found"):
        write_report(tmp_path / "nope")
    monkeypatch.setenv("DIFFMIS_NO_MALLOC_TUNING", "1")
    assert main(["report", "--run", str(tmp_path / "nope")]) == 2
    assert "run folder not found" in capsys.readouterr().err


@pytest.mark.skipif(
    not any(shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome"))
    and not os.environ.get("DIFFMIS_REQUIRE_BROWSER"),
    reason="no Chromium on PATH (apt-get install -y chromium; .ci/run installs it)",
)
def test_screenshot(full_html, tmp_path):
    """The report as a user sees it, rendered by headless Chromium (CI sets DIFFMIS_REQUIRE_BROWSER once it has
    installed Chromium, so a missing browser fails there instead of skipping)."""
    png = tmp_path / "shot.png"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "screenshot.py"), str(full_html), str(png)],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    with Image.open(png) as im:
        assert im.size == (1280, 2400)
        arr = np.asarray(im.convert("RGB"))
    assert png.stat().st_size > 20_000
    assert len(np.unique(arr.reshape(-1, 3), axis=0)) > 200  # text, tables and plots, not a blank page
