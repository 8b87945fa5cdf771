"""Time of one fine-tuning step by memory format and precision (not a test).

EfficientNet-Lite0 with the stem + 10 blocks frozen (the fine-tuning default), AdamW, batch 32,
random inputs: NCHW vs channels_last, fp32 vs bf16 autocast, at each --sizes. Also the eval
forward pass (batch 128) per precision. Median of --steps timed steps after 3 warm-up steps.

    PYTHONPATH=. .venv/bin/python bench/train_step_formats.py --sizes 96 128
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time

import torch

from trainer.backbones import BackboneRegistry, WeightsSource, build_backbone
from trainer.finetune import FineTuneModel


def model(memory_format: torch.memory_format) -> FineTuneModel:
    spec = BackboneRegistry().get("efficientnet_lite0")
    net = FineTuneModel(build_backbone(spec, 10, pretrained=True, weights=WeightsSource()), spec)
    net.freeze(spec.default_freeze)
    return net.to(memory_format=memory_format)


def precision(bf16: bool) -> contextlib.AbstractContextManager:
    return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def train_rate(size: int, memory_format: torch.memory_format, bf16: bool, steps: int) -> float:
    net = model(memory_format).train()
    optimizer = torch.optim.AdamW(net.trainable_parameters(), lr=1e-3)
    x = torch.randn(32, 3, size, size).contiguous(memory_format=memory_format)
    y = torch.randint(0, 10, (32,))
    times = []
    for step in range(steps + 3):
        started = time.perf_counter()
        with precision(bf16):
            loss = torch.nn.functional.cross_entropy(net(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step >= 3:
            times.append(time.perf_counter() - started)
    return 32 / statistics.median(times)


@torch.inference_mode()
def eval_rate(size: int, memory_format: torch.memory_format, bf16: bool, steps: int) -> float:
    net = model(memory_format).eval()
    x = torch.randn(128, 3, size, size).contiguous(memory_format=memory_format)
    times = []
    for step in range(steps + 1):
        started = time.perf_counter()
        with precision(bf16):
            net(x)
        if step >= 1:
            times.append(time.perf_counter() - started)
    return 128 / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[96, 128])
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    formats = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
    for size in args.sizes:
        for name, memory_format in formats.items():
            for bf16 in (False, True):
                row = {
                    "size": size,
                    "format": name,
                    "precision": "bf16" if bf16 else "fp32",
                    "train_images_per_second": train_rate(size, memory_format, bf16, args.steps),
                    "eval_images_per_second": eval_rate(size, memory_format, bf16, args.steps),
                }
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
