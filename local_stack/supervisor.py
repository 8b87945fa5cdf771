"""supervisord for the local stack: the programs it runs (restart policy included), its config
file, and driving it over its XML-RPC socket in $REFIT_DATA_DIR/run, never through pid files:
stopping signals only processes it started itself (their process groups), so a stale pid can
never hit an unrelated process."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
import time
import xmlrpc.client
from dataclasses import dataclass, field
from pathlib import Path

from supervisor.xmlrpc import SupervisorTransport

# Restart policy of every component (supervisor's program options): one that exits is started
# again at once; one that exits again within `startsecs` waits 1 s, 2 s, ... more each time and
# after `startretries` such quick failures is FATAL (`make status` shows it; `make up` retries).
PROGRAM_DEFAULTS = {
    "autostart": "true",
    "autorestart": "true",
    "startsecs": "5",
    "startretries": "10",
    "stopasgroup": "true",  # TorchServe's Java server and its workers, DataLoader workers
    "killasgroup": "true",
    "stopwaitsecs": "30",
    "redirect_stderr": "true",
    "stdout_logfile_maxbytes": "20MB",
    "stdout_logfile_backups": "3",
}
RUNNING_STATES = {"STARTING", "RUNNING", "BACKOFF"}  # alive, or about to be restarted


@dataclass(frozen=True)
class Program:
    """One supervised component: what to run, where, with which extra variables."""

    name: str
    command: list[str]
    directory: Path
    env: dict[str, str] = field(default_factory=dict)


class Supervisor:
    """supervisord for one data dir, driven over its unix socket (XML-RPC)."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.run_dir = data_dir / "run"
        self.config_file = self.run_dir / "supervisord.conf"
        self.log_dir = data_dir / "logs"

    @property
    def socket(self) -> Path:
        path = self.run_dir / "supervisor.sock"
        if len(str(path)) < 100:
            return path
        # A unix socket path is limited to ~107 bytes: a deep data dir gets a short, stable name.
        digest = hashlib.sha256(str(self.data_dir).encode()).hexdigest()[:16]
        return Path(tempfile.gettempdir()) / f"refit-{digest}.sock"

    def rpc(self) -> xmlrpc.client.ServerProxy:
        transport = SupervisorTransport(None, None, f"unix://{self.socket}")
        return xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport)

    def running(self) -> bool:
        try:
            return self.rpc().supervisor.getState()["statename"] == "RUNNING"
        except (OSError, xmlrpc.client.Error):
            return False

    def start(self, programs: list[Program], env: dict[str, str]) -> None:
        """Starts supervisord with ``programs`` (it starts them); if it runs, (re)starts any of
        them that is not running."""
        if self.running():
            self.rpc().supervisor.reloadConfig()
            for info in self.rpc().supervisor.getAllProcessInfo():
                if info["statename"] not in RUNNING_STATES:
                    self.rpc().supervisor.startProcess(info["name"], False)
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.config_file.write_text(self.render(programs))
        supervisord = Path(sys.executable).with_name("supervisord")
        # supervisord daemonizes itself; it keeps this environment for its programs.
        subprocess.run(
            [str(supervisord), "-c", str(self.config_file)], env=env, cwd=self.data_dir, check=True
        )
        deadline = time.monotonic() + 30
        while not self.running():
            if time.monotonic() > deadline:
                raise RuntimeError(f"supervisord did not start; see {self.log_dir}")
            time.sleep(0.1)

    def stop(self, timeout_s: float = 120.0) -> None:
        """Stops every program (their process groups), then supervisord itself."""
        if not self.running():
            return
        self.rpc().supervisor.shutdown()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                self.rpc().supervisor.getState()
            except OSError:  # its socket is closed: it is gone
                return
            except xmlrpc.client.Fault:  # SHUTDOWN_STATE: still stopping its programs
                pass
            time.sleep(0.2)
        raise TimeoutError(f"supervisord did not stop in {timeout_s:.0f}s; see {self.log_dir}")

    def states(self) -> dict[str, dict]:
        if not self.running():
            return {}
        return {info["name"]: info for info in self.rpc().supervisor.getAllProcessInfo()}

    def pid(self, name: str) -> int | None:
        info = self.states().get(name)
        return info["pid"] if info and info["pid"] else None

    def render(self, programs: list[Program]) -> str:
        sections = {
            "unix_http_server": {"file": str(self.socket), "chmod": "0700"},
            "supervisord": {
                "logfile": str(self.log_dir / "supervisord.log"),
                "pidfile": str(self.run_dir / "supervisord.pid"),  # for people; never read here
                "childlogdir": str(self.log_dir),
                "directory": str(self.data_dir),
            },
            "rpcinterface:supervisor": {
                "supervisor.rpcinterface_factory": "supervisor.rpcinterface:make_main_rpcinterface"
            },
            "supervisorctl": {"serverurl": f"unix://{self.socket}"},
        }
        for priority, program in enumerate(programs, start=1):
            sections[f"program:{program.name}"] = {
                **PROGRAM_DEFAULTS,
                "command": " ".join(_quote(arg) for arg in program.command),
                "directory": str(program.directory),
                "priority": str(priority * 10),  # started in this order, stopped in reverse
                "stdout_logfile": str(self.log_dir / f"{program.name}.log"),
                "environment": ",".join(f'{k}="{_escape(v)}"' for k, v in program.env.items()),
            }
        return "".join(
            f"[{name}]\n"
            + "".join(f"{k}={_escape_percent(v)}\n" for k, v in values.items() if v)
            + "\n"
            for name, values in sections.items()
        )


def _quote(arg: str) -> str:
    return f'"{arg}"' if " " in arg else arg


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')


def _escape_percent(value: str) -> str:
    return value.replace("%", "%%")  # supervisor expands %(name)s in every value
