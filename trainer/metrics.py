"""Every Prometheus metric of the trainer process, in one place.

Dataset counters are incremented inside DataLoader worker processes. They reach /metrics through
prometheus_client's multiprocess mode: the launcher sets PROMETHEUS_MULTIPROC_DIR to an empty
directory before the trainer starts (``make up`` and compose do), and ``serve`` then collects
every process's values. Gauges are set by the main process only ("livemostrecent").
"""

from __future__ import annotations

import os
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from refit.settings import declare

# prometheus_client reads it too; declared here as the trainer's configuration.
MULTIPROC_DIR = declare(
    "PROMETHEUS_MULTIPROC_DIR",
    None,
    "an empty directory where the trainer's processes (DataLoader workers too) share metrics",
    parse=Path,
)

DATASET_OBJECTS_READ = Counter(
    "refit_dataset_objects_read_total",
    "Objects (images or shards) read from the object store by training datasets.",
    ["kind"],  # "image" | "shard"
)
DATASET_BYTES_READ = Counter(
    "refit_dataset_bytes_read_total",
    "Bytes read from the object store by training datasets.",
    ["kind"],
)
DATASET_BAD_IMAGES = Counter(
    "refit_dataset_bad_images_total",
    "Images skipped because they could not be decoded or were too large.",
    ["reason"],  # "undecodable" | "too_large"
)

# --- fine-tuning loop (trainer/reporting.py sets these after each epoch) ---
TRAINER_EPOCH = Gauge(
    "refit_trainer_epoch", "Current training epoch (1-based).", multiprocess_mode="livemostrecent"
)
TRAINER_LOSS = Gauge(
    "refit_trainer_loss",
    "Mean loss of the last epoch.",
    ["split"],
    multiprocess_mode="livemostrecent",
)  # train|val
TRAINER_ACCURACY = Gauge(
    "refit_trainer_accuracy",
    "Accuracy of the last epoch (0-1).",
    ["split"],
    multiprocess_mode="livemostrecent",
)  # train|val
TRAINER_IMAGES_PER_SECOND = Gauge(
    "refit_trainer_images_per_second",
    "Training throughput over the current epoch.",
    multiprocess_mode="livemostrecent",
)
TRAINER_DATA_WAIT_RATIO = Gauge(
    "refit_trainer_data_wait_ratio",
    "Fraction of training step time spent waiting for data.",
    multiprocess_mode="livemostrecent",
)
TRAINER_GPU_MEMORY_BYTES = Gauge(
    "refit_trainer_gpu_memory_bytes",
    "Peak GPU memory allocated by this process (0 on CPU).",
    multiprocess_mode="livemostrecent",
)

# --- retraining jobs (trainer/jobs/manager.py) ---
TRAINER_JOBS = Counter(
    "refit_trainer_jobs_total", "Retraining jobs that ended, by final state.", ["state"]
)  # succeeded | failed | cancelled
TRAINER_QUEUE_LENGTH = Gauge(
    "refit_trainer_queue_length",
    "Retraining jobs waiting to start.",
    multiprocess_mode="livemostrecent",
)
TRAINER_JOB_PHASE_SECONDS = Histogram(
    "refit_trainer_job_phase_seconds",
    "Time retraining jobs spent in each phase.",
    ["phase"],  # queue | data | train | export | publish
    buckets=(0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200),
)


def forget_dead_processes() -> None:
    """At start-up: the gauges of a previous trainer (restarted by the supervisor) and its dead
    workers must not be reported as live. Counters stay: they are totals."""
    folder = MULTIPROC_DIR.value(os.environ)
    if folder is None:
        return
    for path in folder.glob("gauge_live*_*.db"):
        pid = int(path.stem.rsplit("_", 1)[1])
        if pid != os.getpid() and not Path(f"/proc/{pid}").exists():
            mark_process_dead(pid, str(folder))


def serve(address: str) -> None:
    """Serves /metrics on ``host:port``; with every process's values in multiprocess mode."""
    host, _, port = address.rpartition(":")
    registry = None
    if MULTIPROC_DIR.value(os.environ) is not None:
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
    start_http_server(int(port), addr=host, **({"registry": registry} if registry else {}))
