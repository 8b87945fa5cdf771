"""A training process ends with the process that started it (a trainer killed outright)."""

from __future__ import annotations

import os
import select
import subprocess
import sys

CHILD = (
    "import signal, time; from trainer.jobs.torchrun import die_with_parent; "
    "die_with_parent(signal.SIGTERM); print('ready', flush=True); time.sleep(60)"
)
PARENT = (
    "import subprocess, sys; "
    f"child = subprocess.Popen([sys.executable, '-c', {CHILD!r}], stdout=subprocess.PIPE); "
    "child.stdout.readline(); print(child.pid, flush=True); sys.stdin.read()"
)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split()[2] != "Z"  # a zombie has ended
    except FileNotFoundError:
        return False


def test_child_gets_sigterm_when_its_parent_is_killed() -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    child = int(parent.stdout.readline())
    exited = os.pidfd_open(child)  # readable once the child has ended: no polling
    try:
        assert alive(child)
        parent.kill()
        parent.wait(10)
        ready, _, _ = select.select([exited], [], [], 10)
        assert ready and not alive(child)
    finally:
        os.close(exited)
        if alive(child):
            os.kill(child, 9)
