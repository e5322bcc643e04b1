"""Built-in data: the MNI brain set offline (network disabled), its folder export, synthetic determinism."""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from diffmis.cli.main import main
from diffmis.config import DataConfig
from diffmis.data import build_dataset, check_dataset, dataset_info, synthetic_sample
from diffmis.data.mni import mni_slices


@pytest.fixture()
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket, "socket", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def test_mni_builds_offline_with_three_classes(no_network: None) -> None:
    mni_slices.cache_clear()  # load the template under the network ban
    cfg = DataConfig(kind="mni", in_channels=1, num_classes=3, image_size=(64, 64))
    sets = {s: build_dataset(cfg, s, train=False) for s in ("train", "val", "test")}
    assert not set(sets["train"].ids) & set(sets["val"].ids) and not set(sets["val"].ids) & set(sets["test"].ids)
    for ds in sets.values():
        assert len(ds) > 15
        z = sorted(int(i[5:]) for i in ds.ids)
        assert z[0] < 40 and z[-1] > 120  # every split covers the brain from bottom to top
    masks = torch.stack([sets["val"][i]["mask"] for i in range(len(sets["val"]))])
    assert masks.shape[1:] == (3, 64, 64)
    assert torch.all(masks.sum(1) == 1)  # one-hot
    assert torch.all(masks.sum((0, 2, 3)) > 0)  # background, grey and white matter all present
    item = sets["train"][len(sets["train"]) // 2]
    assert item["image"].shape == (1, 64, 64) and 0.0 <= item["image"].min() and item["image"].max() <= 1.0
    assert dataset_info(cfg)["class_names"] == ["background", "grey matter", "white matter"]


def test_prepare_mni_brain_reads_back_identically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DIFFMIS_NO_MALLOC_TUNING", "1")
    out = tmp_path / "mni"
    assert main(["data", "prepare", "mni-brain", str(out)]) == 0
    report = check_dataset(out, num_classes=3, in_channels=1)
    assert report.ok and report.label_values == [0, 1, 2] and report.size_min == (233, 197)
    folder = DataConfig(kind="folder", root=str(out), in_channels=1, num_classes=3, image_size=None)
    builtin = folder.model_copy(update={"kind": "mni", "root": None})
    a, b = build_dataset(folder, "val", train=False), build_dataset(builtin, "val", train=False)
    assert a.ids == b.ids
    for i in (0, len(a) - 1):
        assert torch.equal(a[i]["mask"], b[i]["mask"]) and torch.equal(a[i]["image"], b[i]["image"])


def test_synthetic_is_deterministic_and_varied() -> None:
    img1, lab1 = synthetic_sample((40, 48), 3, 3, (7, 0, 1))
    img2, lab2 = synthetic_sample((40, 48), 3, 3, (7, 0, 1))
    img3, _ = synthetic_sample((40, 48), 3, 3, (7, 0, 2))
    assert np.array_equal(img1, img2) and np.array_equal(lab1, lab2) and not np.array_equal(img1, img3)
    assert img1.shape == (3, 40, 48) and img1.dtype == np.uint8 and set(np.unique(lab1)) == {0, 1, 2}
    grey, binary = synthetic_sample((32, 32), 1, 1, 0)
    assert grey.shape == (1, 32, 32) and set(np.unique(binary)) == {0, 1}
    cfg = DataConfig(kind="synthetic", in_channels=4, num_classes=2, image_size=None)  # multi-channel, K = 2
    item = build_dataset(cfg, "test", train=False)[0]
    assert item["image"].shape == (4, 64, 64) and item["mask"].shape == (2, 64, 64)
    assert torch.all(item["mask"].sum(0) == 1)
