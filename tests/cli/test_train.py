"""``refit train``: the command users run, against the embedded FileStore."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from cli import main
from refit.storage import FileStore
from tests.trainer.synthetic import CLASS_NAMES, upload_colours


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FileStore:
    monkeypatch.delenv("MINIO_ENDPOINT", raising=False)
    monkeypatch.setenv("REFIT_DATA_DIR", str(tmp_path))
    return FileStore(tmp_path / "objects")


def test_train_command_stores_an_archive_and_reports_it(
    store: FileStore, capsys: pytest.CaptureFixture[str]
) -> None:
    uri = upload_colours(store, "data", "colours", train=6, val=2, size=32)
    argv = ["train", "--dataset", uri, "--out", "colours", "--epochs", "1", "--batch-size", "8",
            "--crop-size", "32", "--workers", "0", "--freeze", "default", "--json"]  # fmt: skip
    assert main(argv) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert result["class_names"] == CLASS_NAMES and result["version"] == "1"
    assert result["archive"].startswith("s3://refit/archives/colours/")
    key = result["archive"].removeprefix("s3://refit/")
    assert store.stat("refit", key) is not None
    assert "epoch 1/1" in captured.err  # the progress bar
    assert result["lineage"]["frozen_depth"] == 10


def test_train_command_explains_a_missing_backbone_weights_file(
    store: FileStore, capsys: pytest.CaptureFixture[str]
) -> None:
    uri = upload_colours(store, "data", "colours", train=2, val=1, size=16)
    argv = ["train", "--dataset", uri, "--out", "x", "--backbone", "resnet18", "--quiet"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("refit train: no ImageNet weights for backbone 'resnet18'")
    assert "s3://models/backbones/resnet18.pth" in err


def test_train_command_rejects_an_unknown_backbone(
    store: FileStore, capsys: pytest.CaptureFixture[str]
) -> None:
    uri = upload_colours(store, "data", "colours", train=2, val=1, size=16)
    assert main(["train", "--dataset", uri, "--out", "x", "--backbone", "vgg"]) == 1
    assert "unknown backbone 'vgg'" in capsys.readouterr().err


@pytest.mark.integration
def test_train_command_runs_as_two_processes_whose_ranks_agree(
    store: FileStore, capfd: pytest.CaptureFixture[str]
) -> None:
    uri = upload_colours(store, "data", "colours", train=8, val=4, size=32)
    argv = ["train", "--dataset", uri, "--out", "duo", "--epochs", "2", "--batch-size", "4",
            "--crop-size", "32", "--workers", "0", "--device", "cpu", "--nproc-per-node", "2",
            "--json"]  # fmt: skip
    assert main(argv) == 0
    out, err = capfd.readouterr()
    digests = dict(re.findall(r"rank (\d)/2: trained weights sha256 (\w+)", err))
    assert set(digests) == {"0", "1"} and digests["0"] == digests["1"], err[-3000:]
    result = json.loads(out)
    assert result["version"] == "1" and result["lineage"]["dataset_uri"] == uri
    assert store.stat("refit", result["archive"].removeprefix("s3://refit/")) is not None
    metrics = result["metrics"]  # both ranks' images: 32 training images, 2 epochs
    assert metrics["images_per_second"] * metrics["train_seconds"] == pytest.approx(64)
    assert "epoch 2/2" in err  # the progress bar, fed by rank 0's events
