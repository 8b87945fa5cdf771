"""Export a trained model and package it as a TorchServe archive (.mar) with refit's handler.

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

from trainer.preprocessing import Preprocessing
from trainer.serving import handler as handler_module

HANDLER_FILE = Path(handler_module.__file__)


@dataclass(frozen=True)
class Archive:
    path: Path
    digest: str  # sha256 hex of the archive bytes


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


def build_archive(
    model: torch.nn.Module,
    *,
    model_name: str,
    version: str,
    class_names: list[str],
    preprocessing: Preprocessing,
    metadata: dict,
    out_dir: Path,
) -> Archive:
    """Write ``<out_dir>/<sha256>.mar`` holding the exported model, handler and refit.json."""
    traced = export_torchscript(model, preprocessing.crop_size)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        traced.save(str(work / "model.pt"))
        meta = {"class_names": class_names, **asdict(preprocessing), **metadata}
        (work / handler_module.META_FILE).write_text(json.dumps(meta, indent=1))
        _archive(work, model_name, version)
        built = work / f"{model_name}.mar"
        digest = hashlib.sha256(built.read_bytes()).hexdigest()
        final = out_dir / f"{digest}.mar"
        built.replace(final)
    return Archive(final, digest)


def _archive(work: Path, model_name: str, version: str) -> None:
    """torch-model-archiver, as a child whose temp dir is ``work``: it stages files in
    ``<temp dir>/<model name>/`` and deletes that first, so with the host's /tmp two packagings
    of one model name (two trainers, a test beside a stack) destroyed each other's."""
    command = [sys.executable, "-m", "model_archiver.model_packaging"]
    command += ["--model-name", model_name, "--version", version, "--handler", str(HANDLER_FILE)]
    command += ["--serialized-file", str(work / "model.pt"), "--export-path", str(work)]
    command += ["--extra-files", str(work / handler_module.META_FILE), "--force"]
    env = {**os.environ, "TMPDIR": str(work / "staging")}
    (work / "staging").mkdir()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"torch-model-archiver failed: {done.stderr.strip()[-2000:]}")
