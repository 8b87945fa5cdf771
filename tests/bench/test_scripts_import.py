"""Every bench script imports, as the docs run it (``python bench/x.py``: bench/ first on the
path, the repository root on PYTHONPATH), so a refactor that moves what a script imports breaks
the suite, not the next measurement. Imported under another name than ``__main__``: nothing
runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = sorted((ROOT / "bench").glob("*.py"))
PROBE = """
import importlib.util, sys, traceback
failed = []
for path in sys.argv[1:]:
    name = "probe_" + path.rsplit("/", 1)[-1].removesuffix(".py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = sys.modules[name] = importlib.util.module_from_spec(spec)  # dataclasses need it
    try:
        spec.loader.exec_module(module)
    except Exception:
        failed.append(f"{path}: {traceback.format_exc(limit=1).strip().splitlines()[-1]}")
print("\\n".join(failed))
"""


def test_every_bench_script_imports() -> None:
    assert len(SCRIPTS) > 10
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    probe = [sys.executable, "-c", f"import sys; sys.path.insert(0, 'bench'); {PROBE}"]
    answer = subprocess.run(
        [*probe, *map(str, SCRIPTS)], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=300, check=True,
    )  # fmt: skip
    assert answer.stdout.strip() == "", answer.stdout
