"""What an archive serves, as a torch module a benchmark can score: its ONNX model (fp32 or int8)
run by ONNX Runtime, or, in archives made before ONNX, its TorchScript model."""

from __future__ import annotations

import io
import tempfile
import zipfile
from pathlib import Path

import torch


class OnnxModel(torch.nn.Module):
    """An ONNX model run by ONNX Runtime, as the serving handler runs it."""

    def __init__(self, model: bytes) -> None:
        super().__init__()
        import onnxruntime as ort

        self.session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, {"images": x.numpy()})[0])


def served_model(archive: bytes) -> torch.nn.Module:
    """The model an archive serves: its ONNX model (refit.json says which), or TorchScript."""
    with zipfile.ZipFile(io.BytesIO(archive)) as mar:
        names = set(mar.namelist())
        for name in ("model.int8.onnx", "model.onnx"):
            if name in names:
                return OnnxModel(mar.read(name))
        return torch.jit.load(io.BytesIO(mar.read("model.pt")))


def same_weights(model: torch.nn.Module, crop_size: int) -> dict[str, torch.nn.Module]:
    """``model`` exported as archives held it before (TorchScript) and as fp32 ONNX."""
    from trainer.onnx_export import export_onnx
    from trainer.package import export_torchscript

    model = model.eval()
    with tempfile.TemporaryDirectory() as tmp:
        onnx = export_onnx(model, crop_size, Path(tmp) / "model.onnx").read_bytes()
    return {"torchscript": export_torchscript(model, crop_size), "onnx_fp32": OnnxModel(onnx)}


def stored_model(store, bucket: str, weights_key: str) -> torch.nn.Module:
    """The network whose weights a version stored (trainer/weights.py)."""
    from trainer.backbones import BackboneRegistry, replace_head
    from trainer.weights import load_weights

    saved = load_weights(store, bucket, weights_key)
    spec = BackboneRegistry().get(saved["backbone"])
    net = spec.build()
    replace_head(net, spec, len(saved["class_names"]))
    net.load_state_dict(saved["state_dict"])
    return net.eval()
