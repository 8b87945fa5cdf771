"""``refit train``: the command users run, against the embedded FileStore."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from refit.cli import main
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
