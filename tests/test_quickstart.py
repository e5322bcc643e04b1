"""The quickstart: its plan sized to the machine, its output folder handling (never a user's files), and the whole
pipeline end to end with a tiny fixed plan."""

from __future__ import annotations

import pytest

from diffmis.cli.main import main
from diffmis.errors import ConfigError, InputError
from diffmis.quickstart import FULL_PLAN, FULL_PLAN_3D, MARKER, MIN_SCALE, Plan, plan_training, run_quickstart


def measure(seg96: float, hid96: float):
    """Step times at 96x96 and, 2.25x fewer pixels, at 64x64."""
    return lambda size: (seg96, hid96) if size == 96 else (seg96 / 2.25, hid96 / 2.25)


def test_plan_fits_the_budget_and_never_goes_below_the_smallest_plan():
    fast = plan_training(5.0, measure(0.08, 0.37))  # this project's Zen 4: the full plan in 2 min
    assert (fast.image_size, fast.segmentor_steps, fast.hidiff_steps) == (96, *FULL_PLAN)
    assert fast.minutes == pytest.approx((600 * 0.08 + 200 * 0.37) / 60) and not fast.note
    slow = plan_training(5.0, measure(0.31, 1.37))  # an AVX2-only EPYC in fp32: scaled to the budget
    assert slow.image_size == 96 and slow.minutes == pytest.approx(5.0, rel=0.01)
    assert slow.segmentor_steps / slow.hidiff_steps == pytest.approx(3, rel=0.02)
    tight = plan_training(3.0, measure(0.31, 1.37))  # the smallest plan (3.8 min) fits 1.5 x the budget: 96
    assert (tight.image_size, tight.steps) == (96, int(MIN_SCALE * sum(FULL_PLAN)))
    crawl = plan_training(2.0, measure(0.6, 2.0))  # 96 would take 6.3 min > 1.5 x the budget: 64x64
    assert crawl.image_size == 64 and crawl.steps == int(MIN_SCALE * sum(FULL_PLAN)) and not crawl.note
    hopeless = plan_training(1.0, measure(5.0, 20.0))
    assert hopeless.image_size == 64 and "more than 1 min" in hopeless.note
    with pytest.raises(ConfigError, match="> 0"):
        plan_training(0, measure(0.1, 0.1))


def test_the_3d_plan_is_the_same_rule_on_one_geometry():
    """quickstart --3d on this project's Zen 4 (0.28 s and 1.54 s per step at 48x48x16): the 600 + 200 step plan
    takes 7.9 min, so a 5-minute budget scales both phases by 300 / 476 to 378 + 126 steps."""
    plan = plan_training(5.0, lambda size: (0.28, 1.54), sizes=(0,), full_plan=FULL_PLAN_3D)
    assert (plan.image_size, plan.segmentor_steps, plan.hidiff_steps) == (0, 378, 126) and not plan.note
    assert plan.minutes == pytest.approx(5.0, rel=0.01)


def test_bad_options_change_nothing(tmp_path, capsys):
    own = tmp_path / "mine"
    own.mkdir()
    (own / "thesis.tex").write_text("precious")
    for args in (["--minutes", "-1"], ["--minutes", "0"], ["--image-size", "0"], ["--image-size", "100"], []):
        code = main(["quickstart", "--out", str(own), *args]) if args != ["--image-size", "0"] else None
        if code is None:  # argparse refuses a non-positive size itself
            with pytest.raises(SystemExit):
                main(["quickstart", "--out", str(own), *args])
        else:
            assert code == 2
        assert (own / "thesis.tex").read_text() == "precious"
        assert sorted(p.name for p in own.iterdir()) == ["thesis.tex"]
    err = capsys.readouterr().err
    assert "--minutes must be > 0" in err and "multiple of 32" in err
    assert "not empty and was not written by a quickstart" in err and "nothing was changed" in err
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="is a file"):
        run_quickstart(tmp_path / "file")


def test_the_whole_pipeline_with_a_tiny_plan(tmp_path):
    """Data, training, prediction (segmentor and HiDiff), evaluation and the report; a second run replaces the
    first (its marker says it is a quickstart folder)."""
    plan = Plan(image_size=32, segmentor_steps=2, hidiff_steps=2, segmentor_step_s=0.0, hidiff_step_s=0.0, minutes=0.0)
    lines: list[str] = []
    res = run_quickstart(tmp_path / "qs", plan=plan, log=lines.append)
    assert res.steps == 4 and res.report.is_file() and (tmp_path / "qs" / MARKER).is_file()
    assert set(res.dice) == {"segmentor", "hidiff"} and all(0.0 <= d <= 1.0 for d in res.dice.values())
    text = "\n".join(lines)
    assert "plan: 2 segmentor steps" in text and "precision=" in text and "report:" in text
    assert (res.run_dir / "eval" / "hidiff" / "summary.json").is_file()
    assert len(list((res.run_dir / "predictions" / "hidiff" / "uncertainty").glob("*.npy"))) == 24
    (tmp_path / "qs" / "leftover.txt").write_text("from the first run")
    run_quickstart(tmp_path / "qs", plan=plan, log=lambda s: None)
    assert not (tmp_path / "qs" / "leftover.txt").exists()


def test_the_3d_pipeline_with_a_tiny_plan(tmp_path):
    """``quickstart --3d``: 3D slabs as nnU-Net data, 3D HiDiff, sliding-window NIfTI predictions on the input's
    affine, per-volume scores in mm, the report."""
    import nibabel as nib

    from diffmis.quickstart import run_quickstart_3d

    plan = Plan(image_size=0, segmentor_steps=2, hidiff_steps=2, segmentor_step_s=0.0, hidiff_step_s=0.0, minutes=0.0,
                geometry="48x48x16 patches")
    lines: list[str] = []
    res = run_quickstart_3d(tmp_path / "qs3d", plan=plan, log=lines.append)
    assert res.steps == 4 and res.report.is_file() and set(res.dice) == {"segmentor", "hidiff"}
    text = "\n".join(lines)
    assert "per-volume Dice" in text and "48x48x16 patches" in text
    pred = nib.load(str(res.run_dir / "predictions" / "hidiff" / "mni3d_z48.nii.gz"))
    ref = nib.load(str(tmp_path / "qs3d" / "test_masks" / "mni3d_z48.nii.gz"))
    assert pred.shape == ref.shape == (80, 96, 16) and (pred.affine == ref.affine).all()
    summary = (res.run_dir / "eval" / "hidiff" / "summary.json").read_text()
    assert "per volume" in summary
