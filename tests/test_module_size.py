"""No Python module of the project is over 400 lines (a project rule: split by responsibility)."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 400


def tracked_python_files() -> list[Path]:
    listed = subprocess.run(
        ["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    return [ROOT / name for name in listed if (ROOT / name).is_file()]


def test_every_module_is_at_most_400_lines() -> None:
    files = tracked_python_files()
    assert files, "git ls-files found no Python files"
    counts = {path.relative_to(ROOT): len(path.read_text().splitlines()) for path in files}
    over = sorted((lines, str(path)) for path, lines in counts.items() if lines > MAX_LINES)
    listing = "\n".join(f"  {path}: {lines} lines" for lines, path in reversed(over))
    assert not over, f"modules over {MAX_LINES} lines (split them by responsibility):\n{listing}"
