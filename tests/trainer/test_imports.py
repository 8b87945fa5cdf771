"""Modules that training and the promotion gate import stay clear of TorchServe's packages."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

TORCHSERVE_PACKAGES = ("ts", "model_archiver")


def torchserve_modules_after_import(module: str) -> list[str]:
    """TorchServe modules in a fresh interpreter after ``import module``."""
    code = (
        f"import json, sys, {module}\n"
        f"print(json.dumps([m for m in sys.modules if m.split('.')[0] in {TORCHSERVE_PACKAGES}]))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


@pytest.mark.parametrize("module", ["trainer.transforms", "trainer.jobs.gate"])
def test_transforms_and_the_gate_do_not_import_torchserve(module: str) -> None:
    assert torchserve_modules_after_import(module) == []


def test_the_check_sees_torchserve_where_it_is_imported() -> None:
    # Packaging needs the handler, which subclasses TorchServe's: the check above can fail.
    assert "ts" in torchserve_modules_after_import("trainer.package")
