"""The TorchServe handler's batch logic, with a stand-in model (the real one runs in
tests/service/test_server.py through TorchServe)."""

from __future__ import annotations

import inspect
import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import torch
from PIL import Image
from torchvision.transforms import v2

from tests.conftest import encode
from trainer.serving import handler as handler_module
from trainer.serving.handler import RefitImageClassifier

ROOT = Path(__file__).resolve().parents[3]
COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}


def handler() -> RefitImageClassifier:
    """Class i scores the mean of channel i: a red image is "red", a blue one "blue"."""
    h = RefitImageClassifier()
    h.class_names = list(COLOURS)
    h.transform = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])
    h.device = torch.device("cpu")
    h.model = lambda images: 20 * images.mean(dim=(2, 3))
    return h


def image(colour: str) -> bytes:
    return encode(Image.new("RGB", (8, 8), COLOURS[colour]), "PNG")


def answers(rows: list[dict]) -> list[dict]:
    h = handler()
    return [json.loads(a) for a in h.postprocess(h.inference(h.preprocess(rows)))]


def test_each_row_gets_its_own_answer() -> None:
    rows = [{"data": image("red"), "top_k": b"1"}, {"data": image("blue"), "top_k": b"2"}]
    first, second = answers(rows)
    assert [p["label"] for p in first["predictions"]] == ["red"]
    assert [p["label"] for p in second["predictions"]][:1] == ["blue"]


def test_a_bad_top_k_fails_only_its_row_and_shifts_no_other() -> None:
    """The image of a row whose top_k is bad used to be batched anyway, so every later row
    read the probabilities of the row before it."""
    rows = [
        {"data": image("red"), "top_k": b"many"},
        {"data": image("blue"), "top_k": b"1"},
        {"data": b"not an image", "top_k": b"1"},
        {"data": image("green"), "top_k": b"1"},
    ]
    bad_k, blue, undecodable, green = answers(rows)
    assert "top_k" in bad_k["error"]
    assert blue["predictions"][0]["label"] == "blue"
    assert "cannot decode" in undecodable["error"]
    assert green["predictions"][0]["label"] == "green"


def decompression_bomb() -> bytes:
    """A PNG header announcing twice Pillow's pixel limit: Image.open raises
    DecompressionBombError, which is neither OSError nor ValueError. The service refuses it first
    unless REFIT_MAX_IMAGE_PIXELS is raised above Pillow's limit; a direct caller is not checked."""
    limit = 2 * Image.MAX_IMAGE_PIXELS + 1
    width = 20_000
    header = struct.pack(">IIBBBBB", width, limit // width + 1, 1, 0, 0, 0, 0)
    body = b"IHDR" + header
    ihdr = struct.pack(">I", len(header)) + body + struct.pack(">I", zlib.crc32(body))
    return b"\x89PNG\r\n\x1a\n" + ihdr + b"\x00\x00\x00\x00IEND\xaeB`\x82"


def test_any_failure_to_decode_one_image_fails_that_row_alone() -> None:
    """TorchServe answers a batch whose handler raises with one error for every request in it:
    a row's decode error must stay in its row, whatever its type."""
    rows = [
        {"data": image("red"), "top_k": b"1"},
        {"data": decompression_bomb(), "top_k": b"1"},
        {"data": image("blue"), "top_k": b"1"},
    ]
    red, bomb, blue = answers(rows)
    assert "cannot decode" in bomb["error"] and "decompression bomb" in bomb["error"]
    assert red["predictions"][0]["label"] == "red"
    assert blue["predictions"][0]["label"] == "blue"


def test_the_handler_does_not_import_torchvision() -> None:
    """torchvision's import (with torch._dynamo and sympy) costs every TorchServe worker about
    170 MB of RSS (docs/benchmarks.md, *Memory*); the handler preprocesses with torch alone."""
    probe = "import sys, trainer.serving.handler; print('torchvision' in sys.modules)"
    answer = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert answer.stdout.strip() == "False"


def test_the_handler_module_defines_one_class() -> None:
    """TorchServe refuses to start workers for a handler module with more than one class."""
    defined = [
        value
        for value in vars(handler_module).values()
        if inspect.isclass(value) and value.__module__ == handler_module.__name__
    ]
    assert defined == [RefitImageClassifier]
