"""deploy/containers/engine.sh stop: it ends only the dockerd that `start` started. A pid file
left by an earlier boot may name any process by now; that process must survive."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.deploy.helpers import ROOT

ENGINE = ROOT / "deploy" / "containers" / "engine.sh"


def stop(pidfile: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "REFIT_DOCKERD_PIDFILE": str(pidfile)}
    return subprocess.run(["bash", str(ENGINE), "stop"], env=env, capture_output=True, timeout=60)


def test_stop_spares_a_process_that_is_not_dockerd(tmp_path):
    bystander = subprocess.Popen(["sleep", "120"])
    try:
        pidfile = tmp_path / "dockerd.pid"
        pidfile.write_text(f"{bystander.pid}\n")
        assert stop(pidfile).returncode == 0
        assert bystander.poll() is None, "engine.sh stop killed a process that is not dockerd"
        assert not pidfile.exists()
    finally:
        bystander.kill()
        bystander.wait()


def test_stop_without_a_pidfile_does_nothing(tmp_path):
    assert stop(tmp_path / "absent.pid").returncode == 0
