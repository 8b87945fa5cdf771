"""Export a model to ONNX and run it with ONNX Runtime, as the serving handler does.

The legacy TorchScript-based exporter (``dynamo=False``) at opset 17 exports EfficientNet-Lite0 as
it is (the dynamo exporter would need onnxscript). The batch axis is dynamic: TorchServe batches.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

OPSET = 17
INPUT, OUTPUT = "images", "logits"


def export_onnx(model: torch.nn.Module, crop_size: int, path: Path) -> Path:
    """Write ``model`` (put in eval mode on the CPU) to ``path`` as ONNX."""
    model = model.eval().cpu().to(memory_format=torch.contiguous_format)
    example = torch.rand(2, 3, crop_size, crop_size)
    with torch.inference_mode(False), torch.no_grad():
        torch.onnx.export(
            model, (example,), str(path), dynamo=False, opset_version=OPSET,
            input_names=[INPUT], output_names=[OUTPUT],
            dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}},
        )  # fmt: skip
    return path


def session(path: Path, threads: int = 0) -> ort.InferenceSession:
    """A CPU session (0 threads: ONNX Runtime's choice, one per core)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3  # no per-node warnings in the trainer's log
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def probabilities(sess: ort.InferenceSession, images: np.ndarray) -> np.ndarray:
    logits = sess.run(None, {INPUT: np.ascontiguousarray(images, dtype=np.float32)})[0]
    return softmax(logits)


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


# Images whose reference top-2 probabilities are this close are ties any reordering of float
# sums can flip: top-1 agreement is counted on the others.
TIE_MARGIN = 2e-4


@dataclass
class Agreement:
    """How far a candidate's answers are from a reference's on the same images."""

    images: int = 0
    decided: int = 0  # images that are not ties (TIE_MARGIN)
    same_top1: int = 0  # of the decided ones
    max_probability_diff: float = 0.0

    @property
    def top1_agreement(self) -> float:
        return self.same_top1 / self.decided if self.decided else 1.0

    def add(self, reference: np.ndarray, candidate: np.ndarray) -> None:
        if not len(reference):
            return
        self.images += len(reference)
        top2 = np.sort(reference, axis=1)[:, -2:] if reference.shape[1] > 1 else None
        decided = (top2[:, 1] - top2[:, 0] > TIE_MARGIN) if top2 is not None else None
        same = reference.argmax(1) == candidate.argmax(1)
        if decided is not None:
            same = same[decided]
        self.decided += len(same)
        self.same_top1 += int(same.sum())
        diff = float(np.abs(reference - candidate).max())
        self.max_probability_diff = max(self.max_probability_diff, diff)

    def within(self, min_top1_agreement: float, max_probability_diff: float) -> bool:
        return (self.top1_agreement >= min_top1_agreement
                and self.max_probability_diff <= max_probability_diff)  # fmt: skip

    def as_dict(self) -> dict[str, float]:
        return {"images": self.images, "top1_agreement": self.top1_agreement,
                "max_probability_diff": self.max_probability_diff}  # fmt: skip


def eager_probabilities(model: torch.nn.Module, images: torch.Tensor) -> np.ndarray:
    with torch.inference_mode():
        return torch.softmax(model(images.float()), dim=1).numpy()


def batches(dataset: Iterable, size: int, limit: int | None = None) -> Iterable[tuple]:
    """(images NCHW float32 numpy, labels) batches of a dataset of (tensor, label) pairs,
    at most ``limit`` images in all."""
    images: list[torch.Tensor] = []
    labels: list[int] = []
    for seen, (image, label) in enumerate(dataset):
        if limit is not None and seen >= limit:
            break
        images.append(image)
        labels.append(int(label))
        if len(images) == size:
            yield torch.stack(images).numpy(), np.asarray(labels)
            images, labels = [], []
    if images:
        yield torch.stack(images).numpy(), np.asarray(labels)
