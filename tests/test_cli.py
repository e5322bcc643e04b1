"""The ``diffmis`` console script, in-process: verbs listed, placeholders name their issue, and a smoke test
train -> predict -> evaluate on a 4-case synthetic folder dataset."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from PIL import Image

from _tiny import tiny_config
from diffmis.cli import commands
from diffmis.cli.main import main




@pytest.fixture(autouse=True)
def _no_reexec(monkeypatch):
    monkeypatch.setenv("DIFFMIS_NO_MALLOC_TUNING", "1")  # the CLI would re-execute itself otherwise


def test_help_lists_every_verb(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for verb in ("quickstart", "train", "predict", "evaluate", "report", "benchmark", "data"):
        assert verb in out, verb
    assert main([]) == 0  # no verb: the help, exit 0


def test_every_verb_has_a_module():
    for verb in commands.VERB_LIST:
        add_args, fn = commands.load_verb(verb)
        assert callable(add_args) and callable(fn), verb


def test_benchmark_times_a_config_and_writes_json(tmp_path, capsys):
    cfg = tiny_config("hidiff", tmp_path / "runs")
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "bm" / "speed.json"
    assert main(["benchmark", str(tmp_path / "tiny.yaml"), "--steps", "2", "--warmup", "1", "--predict-images",
                 "2", "--set", "sample.ensemble=2", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["recipe"] == "hidiff" and res["params"] > 0 and res["settings"]["size"] == [32, 32]
    assert res["train"]["timed_steps"] == 2 and res["train"]["images_per_s"] > 0
    assert res["predict"]["ensemble"] == 2 and res["predict"]["nfe_per_image"] == 4  # segmentor + 3 steps
    assert res["predict"]["seconds_per_image"] > 0 and res["machine"]["usable_cores"] >= 1
    # the resolved precision and the CPU it was resolved for are on record
    assert res["settings"]["precision_requested"] == "auto" and res["settings"]["precision"] in ("fp32", "bf16")
    assert res["settings"]["precision_reason"].startswith("auto:")
    assert res["machine"]["cpu"]["model"] and isinstance(res["machine"]["cpu"]["flags"], list)
    assert "images/s" in capsys.readouterr().out


def test_benchmark_bad_config_key_is_a_clear_error(tmp_path, capsys):
    cfg = tiny_config("segmentor", tmp_path / "runs")
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    rc = main(["benchmark", str(tmp_path / "tiny.yaml"), "--set", "train.nonsense=1"])
    assert rc != 0
    assert "train.nonsense" in capsys.readouterr().err


def test_unknown_verb_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["frobnicate"])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_train_predict_evaluate(tmp_path, capsys):
    ds = tmp_path / "ds"
    assert main(["data", "prepare", "synthetic", str(ds), "--n", "4", "--size", "32", "--channels", "1"]) == 0
    assert len(list((ds / "images").iterdir())) == 4

    cfg = tiny_config("conditional_unet", tmp_path / "runs", steps=5)
    cfg["data"].update({"kind": "folder", "root": str(ds)})
    del cfg["data"]["synthetic"]
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    run = tmp_path / "runs" / "cli"
    assert main(["train", str(tmp_path / "tiny.yaml"), "--out", str(run),
                 "--set", "train.max_steps=2", "--set", "sample.steps=2"]) == 0
    state = json.loads((run / "checkpoints" / "last" / "state.json").read_text())
    assert state["step"] == 2  # the override won over the file's max_steps=5
    capsys.readouterr()

    pred = tmp_path / "pred"
    assert main(["predict", "--run", str(run), "--input", str(ds / "images"), "--output", str(pred),
                 "--ensemble", "2", "--prob", "--uncertainty", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "4 written, 0 already present, 0 failed" in out and "NFE/image 2" in out
    masks = sorted(pred.glob("*.png"))
    assert [m.name for m in masks] == sorted(f.name for f in (ds / "masks").iterdir())
    assert all(set(np.unique(np.asarray(Image.open(m)))) <= {0, 255} for m in masks)

    assert main(["evaluate", "--pred", str(pred), "--ref", str(ds / "masks"), "--prob", str(pred / "prob"),
                 "--csv", str(tmp_path / "cases.csv")]) == 0
    summary = json.loads((pred / "summary.json").read_text())
    assert summary["n_cases"] == 4 and not summary["missing_predictions"] and "calibration" in summary
    assert 0.0 <= summary["mean"]["1"]["Dice"] <= 1.0
    assert "4 cases" in capsys.readouterr().out
    assert len((tmp_path / "cases.csv").read_text().strip().splitlines()) == 1 + 4  # header + 4 cases x 1 class
