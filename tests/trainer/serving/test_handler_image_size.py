"""The handler's own guard against images whose shorter-side resize would exhaust the worker's
memory (the service refuses them first: tests/service/test_images.py)."""

from __future__ import annotations

from PIL import Image

from tests.conftest import encode
from tests.trainer.serving.test_handler import answers, image
from trainer.serving.handler import decode


def test_a_thin_image_fails_its_row_before_it_is_resized() -> None:
    thin = encode(Image.new("RGB", (1, 30_000), (0, 0, 255)), "PNG")
    red, refused, blue = answers([
        {"data": image("red"), "top_k": b"1"},
        {"data": thin, "top_k": b"1"},
        {"data": image("blue"), "top_k": b"1"},
    ])  # fmt: skip
    assert "1x30000 pixels, an aspect ratio over 20:1" in refused["error"]
    assert red["predictions"][0]["label"] == "red"
    assert blue["predictions"][0]["label"] == "blue"


def test_an_image_at_the_aspect_limit_is_decoded() -> None:
    assert decode(encode(Image.new("RGB", (400, 20)), "PNG")).size == (400, 20)
