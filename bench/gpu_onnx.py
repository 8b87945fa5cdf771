"""bench/gpu_check.py's ONNX Runtime step: the served ONNX model under each execution provider
that this ONNX Runtime offers (TensorRT, CUDA, the CPU's), images/s at batch 32 and the largest
probability difference from the CPU's answers. On a GPU host the ``onnxruntime-gpu`` wheel
(same version as the pinned ``onnxruntime``, installed in its place) brings CUDA's provider, and
TensorRT's where its libraries are installed; without them the step fails on a GPU and names the
missing wheel."""

from __future__ import annotations

import io
import time
import zipfile

import numpy as np

GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


def provider_figures(archive: bytes, crop: int, cpu_only: bool, seconds: float = 5.0) -> str:
    """One line per provider: images/s and the largest probability difference from the CPU."""
    import onnxruntime as ort

    with zipfile.ZipFile(io.BytesIO(archive)) as mar:
        model = mar.read("model.onnx")
    available = ort.get_available_providers()
    wanted = [] if cpu_only else [p for p in GPU_PROVIDERS if p in available]
    if not cpu_only and "CUDAExecutionProvider" not in wanted:
        raise RuntimeError(
            f"ONNX Runtime {ort.__version__} offers {available}: install onnxruntime-gpu=="
            f"{ort.__version__} in place of onnxruntime for CUDA's provider"
        )
    images = np.random.default_rng(0).normal(size=(32, 3, crop, crop)).astype(np.float32)
    reference, lines = None, []
    for provider in ["CPUExecutionProvider", *wanted]:
        session = ort.InferenceSession(model, providers=[provider])
        if session.get_providers()[0] != provider:  # ORT falls back silently: say so
            lines.append(f"{provider}: not usable here (fell back to {session.get_providers()})")
            continue
        probabilities = _softmax(session.run(None, {session.get_inputs()[0].name: images})[0])
        reference = probabilities if reference is None else reference
        done, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            session.run(None, {session.get_inputs()[0].name: images})
            done += len(images)
        rate = done / (time.perf_counter() - start)
        diff = float(np.abs(probabilities - reference).max())
        lines.append(f"{provider}: {rate:.0f} images/s, max probability diff {diff:.1e}")
    return "; ".join(lines)


def _softmax(logits: np.ndarray) -> np.ndarray:
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True)
