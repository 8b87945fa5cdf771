"""supervisord for the local stack: it signals only processes it started itself."""

from __future__ import annotations

import subprocess
from pathlib import Path

from local_stack.supervisor import Program, Supervisor


def test_stopping_never_signals_a_process_it_did_not_start(tmp_path: Path) -> None:
    """The old pid-file manager SIGTERMed (then SIGKILLed) whatever process had reused the pid
    of a stale run/*.pid file; supervisord signals only its own children."""
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        run = tmp_path / "data" / "run"
        run.mkdir(parents=True)
        for name in ("service", "trainer", "prometheus", "supervisord"):
            (run / f"{name}.pid").write_text(str(bystander.pid))
        Supervisor(tmp_path / "data").stop()
        assert bystander.poll() is None, "make down killed a process it did not start"
    finally:
        bystander.kill()
        bystander.wait()


def test_config_quotes_and_escapes_what_supervisor_would_misread(tmp_path: Path) -> None:
    program = Program("x", ["run", "a b"], tmp_path, {"V": 'say "50%"'})
    config = Supervisor(tmp_path).render([program])
    assert 'command=run "a b"\n' in config
    assert 'environment=V="say \\"50%%\\""\n' in config  # %(name)s would be expanded


def test_a_deep_data_dir_gets_a_short_socket_path(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 120)
    assert len(str(Supervisor(deep).socket)) < 100
    assert Supervisor(deep).socket == Supervisor(deep).socket
