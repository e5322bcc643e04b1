"""Dataset checks: each deliberate defect gives exactly one problem naming its file; CLI exit codes; fail-fast."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffmis.cli.main import main
from diffmis.config import DataConfig
from diffmis.data import build_dataset, check_dataset, write_synthetic
from diffmis.errors import DataError


@pytest.fixture()
def clean(tmp_path: Path) -> Path:
    # 12 samples: train = synth_0000..0007, val = 0008..0009, test = 0010..0011
    return write_synthetic(tmp_path / "clean", n=12, size=(32, 32), num_classes=1, channels=3, seed=1)


def _break(root: Path) -> dict[str, tuple[str, str]]:
    """Apply one defect per kind; return kind -> (file the problem must name, words its message must hold)."""
    img, msk, spl = root / "images", root / "masks", root / "splits"
    # truncated JPEG: the header parses, the pixels do not decode
    jpg = img / "synth_0000.jpg"
    Image.open(img / "synth_0000.png").save(jpg, quality=95)
    (img / "synth_0000.png").unlink()
    jpg.write_bytes(jpg.read_bytes()[: len(jpg.read_bytes()) // 2])
    Image.fromarray(np.zeros((20, 24), np.uint8)).save(msk / "synth_0001.png")  # wrong size
    m = np.asarray(Image.open(msk / "synth_0002.png")).copy()
    m[0, 0] = 7
    Image.fromarray(m).save(msk / "synth_0002.png")  # value outside {0, 255}
    with open(spl / "train.txt", "a") as f:
        f.write("ghost_9999\n")  # id without files
    (spl / "empty.txt").write_text("\n")  # empty split
    Image.open(img / "synth_0003.png").save(img / "synth_0003.bmp")  # duplicate stem
    (msk / "synth_0004.png").unlink()  # missing mask
    return {
        "truncated": (str(jpg), "truncated"),
        "size": (str(msk / "synth_0001.png"), "differs from its image"),
        "values": (str(msk / "synth_0002.png"), "{7}"),
        "ghost": (str(spl / "train.txt"), "'ghost_9999' has no image"),
        "empty": (str(spl / "empty.txt"), "empty split"),
        "duplicate": (str(img / "synth_0003.png"), "duplicate stem 'synth_0003'"),
        "missing_mask": (str(img / "synth_0004.png"), "no mask"),
    }


def _matches(problems: list[tuple[str, str]], file: str, words: str) -> list[tuple[str, str]]:
    return [(f, m) for f, m in problems if (f == file or file in m) and words in m]


def test_clean_dataset_reports_counts_and_sizes(clean: Path) -> None:
    report = check_dataset(clean)
    assert report.ok, report.summary()
    assert report.counts["images"] == 12 and report.counts["split:train"] == 8
    assert report.size_min == report.size_max == (32, 32)
    assert report.channels == [3] and report.label_values == [0, 255]


def test_every_defect_gives_one_message_naming_its_file(clean: Path) -> None:
    expected = _break(clean)
    report = check_dataset(clean)
    for kind, (file, words) in expected.items():
        hits = _matches(report.problems, file, words)
        assert len(hits) == 1, f"{kind}: expected one problem naming {file} with '{words}', got {hits}\n" \
                               f"{report.summary()}"
    assert len(report.problems) == len(expected), report.summary()


def test_quick_check_skips_decoding_but_keeps_file_level_problems(clean: Path) -> None:
    expected = _break(clean)
    report = check_dataset(clean, full=False)
    for kind in ("size", "ghost", "empty", "duplicate", "missing_mask"):
        assert len(_matches(report.problems, *expected[kind])) == 1, kind
    for kind in ("truncated", "values"):  # need pixels
        assert not _matches(report.problems, *expected[kind]), kind


def test_binary_masks_must_not_mix_1_and_255(clean: Path) -> None:
    m = np.asarray(Image.open(clean / "masks" / "synth_0005.png")).copy()
    m[0, :2] = (1, 255)
    Image.fromarray(m).save(clean / "masks" / "synth_0005.png")
    (problem,) = check_dataset(clean).problems
    assert problem[0].endswith("synth_0005.png") and "mixes" in problem[1]


def test_declared_labels_and_channels(clean: Path) -> None:
    assert check_dataset(clean, num_classes=1, labels=[0, 255]).ok
    report = check_dataset(clean, num_classes=3, in_channels=1)
    assert any("outside the declared labels {0, 1, 2}" in m for _, m in report.problems)
    assert any("3 channel(s); data.in_channels=1" in m for _, m in report.problems)


def test_build_dataset_fails_fast_with_the_same_messages(clean: Path) -> None:
    expected = _break(clean)
    cfg = DataConfig(kind="folder", root=str(clean), image_size=(32, 32))
    with pytest.raises(DataError) as err:
        build_dataset(cfg, "train", train=True)
    msg = str(err.value)
    for kind in ("size", "ghost", "duplicate", "missing_mask"):
        file, words = expected[kind]
        assert file in msg and words in msg, kind
    with pytest.raises(DataError, match="empty split"):
        build_dataset(cfg, "empty", train=False)


def test_cache_preload_catches_what_headers_cannot(clean: Path) -> None:
    expected = _break(clean)
    for name in ("synth_0001.png", "synth_0004.png"):  # leave only the two pixel-level defects in train
        p = clean / "masks" / name
        Image.fromarray(np.zeros((32, 32), np.uint8)).save(p)
    (clean / "images" / "synth_0003.bmp").unlink()
    (clean / "splits" / "train.txt").write_text("".join(f"synth_{i:04d}\n" for i in range(8)))
    cfg = DataConfig(kind="folder", root=str(clean), image_size=(16, 16), cache=True)
    with pytest.raises(DataError) as err:
        build_dataset(cfg, "train", train=False)
    msg = str(err.value)
    assert "2 problem(s)" in msg
    for kind in ("truncated", "values"):
        file, words = expected[kind]
        assert file in msg and words in msg, kind


def test_missing_split_file_names_file_and_available_splits(clean: Path) -> None:
    (clean / "splits" / "val.txt").unlink()
    cfg = DataConfig(kind="folder", root=str(clean), image_size=(16, 16))
    with pytest.raises(DataError) as err:
        build_dataset(cfg, "val", train=False)
    assert str(clean / "splits" / "val.txt") in str(err.value) and "test, train" in str(err.value)
    cfg = cfg.model_copy(update={"val_fraction": 0.25})
    val = build_dataset(cfg, "val", train=False)
    train = build_dataset(cfg, "train", train=True)
    assert len(val) == 2 and len(train) == 6 and not set(val.ids) & set(train.ids)


def test_cli_exit_codes(clean: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("DIFFMIS_NO_MALLOC_TUNING", "1")
    assert main(["data", "check", str(clean), "--json", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "OK" in out and "min 32x32" in out and (tmp_path / "r.json").is_file()
    expected = _break(clean)
    assert main(["data", "check", str(clean)]) == 2
    out = capsys.readouterr().out
    for file, _ in expected.values():
        assert file in out
    assert main(["data", "check", str(tmp_path / "nowhere")]) == 2


def test_field_of_view_masks_pair_by_stem_or_mask_suffix(clean: Path) -> None:
    fov = clean / "fov"
    fov.mkdir()
    disc = np.zeros((32, 32), np.uint8)
    disc[4:28, 4:28] = 255
    for i in range(12):  # original DRIVE naming for half of them: <id>_mask
        Image.fromarray(disc).save(fov / (f"synth_{i:04d}_mask.png" if i % 2 else f"synth_{i:04d}.png"))
    assert check_dataset(clean).ok
    item = build_dataset(DataConfig(kind="folder", root=str(clean), image_size=None), "val", train=False)[1]
    assert item["fov"].shape == (1, 32, 32) and item["fov"].sum() == 24 * 24
    bad = disc.copy()
    bad[0, 0] = 3
    Image.fromarray(bad).save(fov / "synth_0009_mask.png")
    (fov / "synth_0010.png").unlink()
    report = check_dataset(clean)
    assert len(report.problems) == 2, report.summary()
    assert _matches(report.problems, str(fov / "synth_0009_mask.png"), "not binary")
    assert _matches(report.problems, str(clean / "images" / "synth_0010.png"), "no field-of-view mask")
