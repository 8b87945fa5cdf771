"""Package an exported model as a TorchServe archive (.mar) with refit's handler for its runtime.

ONNX (fp32 or int8, run by ONNX Runtime inside TorchServe) is what refit serves; TorchScript
archives (trainer/serving/handler.py) are what it served before, and still serve side by side.
Archives are content-addressed: the object key is the SHA-256 of the .mar bytes, so a key never
changes meaning and TorchServe's model store (a cache) never sees two files under one name.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from trainer.onnx_export import Agreement, eager_probabilities, export_onnx, probabilities, session
from trainer.precision import FP32
from trainer.preprocessing import Preprocessing
from trainer.serving import handler as torchscript_handler
from trainer.serving import onnx_handler

ONNX, TORCHSCRIPT = "onnx", "torchscript"
HANDLERS = {ONNX: Path(onnx_handler.__file__), TORCHSCRIPT: Path(torchscript_handler.__file__)}
META_FILE = onnx_handler.META_FILE
PROBE_MAX_PROBABILITY_DIFF = 1e-4  # random probes, when no real images are at hand


@dataclass(frozen=True)
class Archive:
    path: Path
    digest: str  # sha256 hex of the archive bytes


@dataclass(frozen=True)
class ExportedModel:
    """A serialized model and how the handler runs it."""

    path: Path  # model.onnx or model.pt
    runtime: str  # ONNX or TORCHSCRIPT
    precision: str = FP32


def export_torchscript(
    model: torch.nn.Module, crop_size: int, atol: float = 1e-4
) -> torch.jit.ScriptModule:
    """Trace ``model`` on CPU and check the traced outputs match eager ones."""
    # Contiguous weights: the served model gets plain NCHW batches from the handler.
    model = model.eval().cpu().to(memory_format=torch.contiguous_format)
    example = torch.rand(2, 3, crop_size, crop_size)
    with torch.inference_mode():
        traced = torch.jit.trace(model, example, check_trace=False)
        probe = torch.rand(3, 3, crop_size, crop_size)
        eager_out, traced_out = model(probe), traced(probe)
    if not torch.allclose(eager_out, traced_out, atol=atol, rtol=1e-3):
        diff = (eager_out - traced_out).abs().max().item()
        raise RuntimeError(f"exported model differs from eager model (max abs diff {diff:.2e})")
    return traced


def export_model(model: torch.nn.Module, crop_size: int, work: Path, runtime: str = ONNX
                 ) -> ExportedModel:  # fmt: skip
    """fp32 ``model`` in ``work``, checked against the eager model on random probe images (the
    trainer checks ONNX again on the version's validation images: trainer/serving_model.py)."""
    if runtime == TORCHSCRIPT:
        path = work / "model.pt"
        export_torchscript(model, crop_size).save(str(path))
        return ExportedModel(path, TORCHSCRIPT)
    if runtime != ONNX:
        raise ValueError(f"runtime must be {ONNX!r} or {TORCHSCRIPT!r}, got {runtime!r}")
    path = export_onnx(model, crop_size, work / "model.onnx")
    probe = torch.rand(3, 3, crop_size, crop_size) * 4 - 2  # about the normalized range
    agreement = Agreement()
    agreement.add(eager_probabilities(model, probe), probabilities(session(path), probe.numpy()))
    if agreement.max_probability_diff > PROBE_MAX_PROBABILITY_DIFF:
        raise RuntimeError(f"ONNX model differs from eager model: {agreement.as_dict()}")
    return ExportedModel(path, ONNX)


def build_archive(
    model: torch.nn.Module,
    *,
    model_name: str,
    version: str,
    class_names: list[str],
    preprocessing: Preprocessing,
    metadata: dict,
    out_dir: Path,
    runtime: str = ONNX,
) -> Archive:
    """Export ``model`` at fp32 and package it (``package``)."""
    with tempfile.TemporaryDirectory() as tmp:
        exported = export_model(model, preprocessing.crop_size, Path(tmp), runtime)
        return package(
            exported, model_name=model_name, version=version, class_names=class_names,
            preprocessing=preprocessing, metadata=metadata, out_dir=out_dir,
        )  # fmt: skip


def package(
    exported: ExportedModel,
    *,
    model_name: str,
    version: str,
    class_names: list[str],
    preprocessing: Preprocessing,
    metadata: dict,
    out_dir: Path,
) -> Archive:
    """Write ``<out_dir>/<sha256>.mar`` holding the model, its handler and refit.json (class
    names, preprocessing, runtime, precision and ``metadata``)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        serialized = work / exported.path.name
        serialized.write_bytes(exported.path.read_bytes())
        meta = {"class_names": class_names, **asdict(preprocessing), **metadata,
                "runtime": exported.runtime, "precision": exported.precision}  # fmt: skip
        (work / META_FILE).write_text(json.dumps(meta, indent=1))
        _archive(work, serialized, HANDLERS[exported.runtime], model_name, version)
        built = work / f"{model_name}.mar"
        digest = hashlib.sha256(built.read_bytes()).hexdigest()
        final = out_dir / f"{digest}.mar"
        built.replace(final)
    return Archive(final, digest)


def _archive(work: Path, serialized: Path, handler: Path, model_name: str, version: str) -> None:
    """torch-model-archiver, as a child whose temp dir is ``work``: it stages files in
    ``<temp dir>/<model name>/`` and deletes that first, so with the host's /tmp two packagings
    of one model name (two trainers, a test beside a stack) destroyed each other's."""
    command = [sys.executable, "-m", "model_archiver.model_packaging"]
    command += ["--model-name", model_name, "--version", version, "--handler", str(handler)]
    command += ["--serialized-file", str(serialized), "--export-path", str(work)]
    command += ["--extra-files", str(work / META_FILE), "--force"]
    env = {**os.environ, "TMPDIR": str(work / "staging")}
    (work / "staging").mkdir()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"torch-model-archiver failed: {done.stderr.strip()[-2000:]}")
