from __future__ import annotations

import io

import pytest
from PIL import Image
from prometheus_client import REGISTRY

from tests.trainer.data.helpers import jpeg, png
from trainer.data.decode import BadImage, BadImageBudget, DecodeOptions, decode_image
from trainer.data.errors import TooManyBadImages


def bad_count(reason: str) -> float:
    return REGISTRY.get_sample_value("refit_dataset_bad_images_total", {"reason": reason}) or 0.0


def test_decodes_to_rgb() -> None:
    gray = io.BytesIO()
    Image.new("L", (5, 3), 9).save(gray, format="PNG")
    for data in (png(1), jpeg(), gray.getvalue()):
        assert decode_image(data, DecodeOptions()).mode == "RGB"


@pytest.mark.parametrize("data", [b"", b"not an image at all", jpeg(64)[:300]])
def test_garbage_and_truncated_images_are_bad(data: bytes) -> None:
    with pytest.raises(BadImage) as err:
        decode_image(data, DecodeOptions())
    assert err.value.reason == "undecodable"


def test_decompression_bomb_is_rejected_from_the_header() -> None:
    bomb = io.BytesIO()
    Image.new("L", (4000, 4000)).save(bomb, format="PNG")  # 16 Mpx in a few KB
    assert len(bomb.getvalue()) < 50_000
    with pytest.raises(BadImage) as err:
        decode_image(bomb.getvalue(), DecodeOptions(max_pixels=1_000_000))
    assert err.value.reason == "too_large"
    assert decode_image(bomb.getvalue(), DecodeOptions(max_pixels=16_000_000)).size == (4000, 4000)


def test_budget_allows_the_fraction_then_fails() -> None:
    budget = BadImageBudget(total=40, max_fraction=0.05)  # 2 allowed
    before = bad_count("undecodable")
    budget.record("a.jpg", BadImage("undecodable", "x"))
    budget.record("b.jpg", BadImage("undecodable", "x"))
    assert bad_count("undecodable") == before + 2
    with pytest.raises(TooManyBadImages, match="3 of 40") as err:
        budget.record("c.jpg", BadImage("undecodable", "x"))
    assert "c.jpg" in err.value.message


def test_budget_zero_fraction_fails_on_the_first_bad_image() -> None:
    with pytest.raises(TooManyBadImages):
        BadImageBudget(total=1000, max_fraction=0.0).record("a.jpg", BadImage("too_large", "x"))
    with pytest.raises(ValueError):
        BadImageBudget(total=10, max_fraction=1.5)
