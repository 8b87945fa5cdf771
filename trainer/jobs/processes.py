"""Training as N processes under torchrun (DDP: nccl on GPUs, gloo on CPUs), supervised from
outside: the trainer keeps the job (states, progress, cancellation, checkpoint/resume,
publishing) exactly as for a job that trains in its own process, and ``refit train
--nproc-per-node`` uses the same path with a progress bar.

torchrun runs as a child process (``python -m trainer.jobs.torchrun``: torch.distributed.run that
ends with its parent), not through torch's launcher API inside the trainer:
- training's crashes, hangs and memory stay out of the process that serves the job API (whose
  gRPC threads also make forking it unsafe);
- cancelling is one signal: on SIGTERM torchrun's agent stops every rank (each rank's process
  group, DataLoader workers included), then exits;
- it is the very command a user runs by hand, on one node or across several.
Rendezvous is the elastic agent's: ``--standalone`` (a c10d store on a free loopback port) on
one node, or ``--rdzv-endpoint`` for several.

The supervisor and the ranks share a private directory (``JobDir``, trainer/jobs/job_dir.py): the
config goes in; rank 0 appends progress events and writes the result; a rank that fails writes
why, in the job's own terms (trainer/jobs/failures.py). Checkpoints and archives go to the
object store, from rank 0 only (trainer/loop.py, trainer/artifacts.py), so a job resumes from its
checkpoint whatever ran it.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from refit.storage import StorageSettings
from trainer.artifacts import TrainResult
from trainer.config import TrainConfig
from trainer.engine import EventSink, ProgressEvent
from trainer.jobs.job_dir import EventTail, JobDir
from trainer.jobs.records import JobCancelled
from trainer.jobs.torchrun import TRAINER_PID

log = logging.getLogger(__name__)
POLL_S = 0.2  # how often the supervisor reads new progress events and checks for a cancel
STOP_GRACE_S = 15.0  # torchrun's agent stops its ranks within this after SIGTERM, or is killed


@dataclass(frozen=True)
class Launch:
    """How many processes, and where they meet."""

    nproc_per_node: int
    nnodes: int = 1
    rdzv_endpoint: str | None = None  # HOST:PORT; None: --standalone (this node only)
    rdzv_id: str = "refit"  # the same on every node of one run

    def __post_init__(self) -> None:
        if self.nproc_per_node < 1 or self.nnodes < 1:
            raise ValueError("need at least one process per node and one node")
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise ValueError("a run on several nodes needs a rendezvous endpoint (HOST:PORT)")

    def torchrun_args(self) -> list[str]:
        if self.rdzv_endpoint is None:
            meet = ["--standalone"]
        else:
            meet = ["--nnodes", str(self.nnodes), "--rdzv-backend", "c10d",
                    "--rdzv-endpoint", self.rdzv_endpoint, "--rdzv-id", self.rdzv_id]  # fmt: skip
        return [*meet, "--nproc-per-node", str(self.nproc_per_node), "--max-restarts", "0"]


def launch_command(launch: Launch, job_dir: Path) -> list[str]:
    torchrun = [sys.executable, "-m", "trainer.jobs.torchrun", *launch.torchrun_args()]
    return [*torchrun, "-m", "trainer.jobs.worker", str(job_dir)]


def launch_env(
    processes: int,
    storage: StorageSettings,
    base: Mapping[str, str] | None = None,
    cpus: int | None = None,
) -> dict[str, str]:
    """The ranks' environment: the store they read and write, and the host's cores shared
    between them (torchrun would give each rank one thread)."""
    base = os.environ if base is None else base
    env = {k: v for k, v in base.items() if not k.startswith("MINIO_")} | storage.to_env()
    cpus = cpus or len(os.sched_getaffinity(0))
    env.setdefault("OMP_NUM_THREADS", str(max(1, cpus // processes)))
    env[TRAINER_PID.name] = str(os.getpid())
    return env


# --- the supervisor --------------------------------------------------------------------------


def train_in_processes(
    config: TrainConfig,
    launch: Launch,
    storage: StorageSettings,
    *,
    on_event: EventSink | None = None,
    cancelled: Callable[[], bool] = lambda: False,
    wait: Callable[[float], None] = time.sleep,
) -> TrainResult | None:
    """Train ``config`` as ``launch`` says and return rank 0's result (None when rank 0 is on
    another node). ``cancelled()`` turning true stops every process and raises JobCancelled;
    ``wait(seconds)`` paces the polling (an Event's wait wakes at once on a cancel)."""
    with tempfile.TemporaryDirectory(prefix=f"refit-{config.run_id or config.out}-") as tmp:
        job_dir = JobDir(Path(tmp))
        job_dir.write_config(config)
        env = launch_env(launch.nproc_per_node, storage)
        process = subprocess.Popen(launch_command(launch, job_dir.path), env=env)
        log.info("training on %d processes (torchrun pid %d)", launch.nproc_per_node, process.pid)
        tail, last = EventTail(job_dir.events), None
        try:
            while process.poll() is None:
                last = _forward(tail, on_event) or last
                if cancelled():
                    stop(process)
                    raise JobCancelled(_cancelled_at(last, launch))
                wait(POLL_S)
            _forward(tail, on_event)
        finally:
            stop(process)
        if process.returncode != 0:
            raise job_dir.failure(process.returncode)
        return job_dir.read_result()


def _forward(tail: EventTail, on_event: EventSink | None) -> ProgressEvent | None:
    last = None
    for last in tail.read():
        if on_event is not None:
            on_event(last)
    return last


def _cancelled_at(last: ProgressEvent | None, launch: Launch) -> str:
    where = f"in epoch {last.epoch} at batch {last.batch}" if last else "before its first batch"
    return f"training cancelled {where}; its {launch.nproc_per_node} processes were stopped"


def stop(process: subprocess.Popen) -> None:
    """SIGTERM to torchrun, whose agent stops every rank then exits; SIGKILL if it lingers (the
    ranks then die with it: trainer/jobs/worker.py)."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        log.warning("torchrun (pid %d) ignored SIGTERM for %.0fs; killing it", process.pid,
                    STOP_GRACE_S)  # fmt: skip
        process.kill()
        process.wait()
