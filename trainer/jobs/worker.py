"""One rank of a multi-process training run: ``python -m trainer.jobs.worker JOB_DIR``, started by
torchrun (trainer/jobs/processes.py). It trains the directory's config; rank 0 appends progress
events and writes the result there; a rank that fails writes why, in the job's terms.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path

from trainer.jobs.torchrun import die_with_parent

log = logging.getLogger(__name__)


def main(argv: list[str]) -> int:
    die_with_parent(signal.SIGKILL)  # torchrun killed outright: no rank trains on alone
    from refit import logs
    from refit.storage import StorageSettings
    from trainer.jobs.failures import describe, training_error
    from trainer.jobs.job_dir import EventWriter, JobDir
    from trainer.train import train_and_package

    rank, world_size = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    logs.configure(f"trainer-rank{rank}")
    job_dir = JobDir(Path(argv[0]))
    config = job_dir.read_config()
    store = StorageSettings.from_env().open()
    events = EventWriter(job_dir.events, world_size) if rank == 0 else None
    with logs.bound(logs.job_id, config.run_id or ""):
        try:
            result = train_and_package(config, store, on_event=events)
        except Exception as exc:
            error = training_error(exc)
            if error is None:
                log.exception("rank %d of %d failed", rank, world_size)
            job_dir.write_error(rank, error, detail=describe(exc))
            return 1
    if result is not None:
        job_dir.write_result(result)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
