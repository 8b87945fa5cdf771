"""Packaging a .mar: torch-model-archiver stages files in <temp dir>/<model name>/, shared by
every process on the host; two trainers (or a test run beside a stack) packaging the same model
name deleted each other's staging ("No such file or directory: /tmp/colours/refit.json")."""

from __future__ import annotations

import json
import tempfile
import uuid
import zipfile
from pathlib import Path

from torch import nn

from trainer.package import build_archive
from trainer.preprocessing import Preprocessing


def test_packaging_never_touches_another_process_staging_dir(tmp_path: Path) -> None:
    name = f"pkg-{uuid.uuid4().hex[:8]}"
    foreign = Path(tempfile.gettempdir()) / name  # another packaging of the same name, mid-way
    foreign.mkdir()
    (foreign / "refit.json").write_text("{}")
    try:
        model = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 2))
        archive = build_archive(
            model,
            model_name=name,
            version="1",
            class_names=["a", "b"],
            preprocessing=Preprocessing(resize_size=36, crop_size=32),
            metadata={},
            out_dir=tmp_path / "out",
        )
        assert (foreign / "refit.json").read_text() == "{}"
        with zipfile.ZipFile(archive.path) as mar:
            assert {"model.onnx", "refit.json", "onnx_handler.py"} <= set(mar.namelist())
            meta = json.loads(mar.read("refit.json"))
        assert (meta["runtime"], meta["precision"]) == ("onnx", "fp32")
    finally:
        for child in foreign.glob("*"):
            child.unlink()
        foreign.rmdir()


def test_torchscript_archives_can_still_be_built(tmp_path: Path) -> None:
    """What refit served before ONNX: the benchmark and the side-by-side serving test build one."""
    model = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 2))
    archive = build_archive(
        model,
        model_name="old-style",
        version="1",
        class_names=["a", "b"],
        preprocessing=Preprocessing(resize_size=36, crop_size=32),
        metadata={},
        out_dir=tmp_path,
        runtime="torchscript",
    )
    with zipfile.ZipFile(archive.path) as mar:
        assert {"model.pt", "refit.json", "handler.py"} <= set(mar.namelist())
        manifest = json.loads(mar.read("MAR-INF/MANIFEST.json"))
        meta = json.loads(mar.read("refit.json"))
    assert manifest["model"]["handler"] == "handler.py"
    assert (meta["runtime"], meta["precision"]) == ("torchscript", "fp32")
