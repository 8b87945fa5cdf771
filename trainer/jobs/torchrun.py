"""``python -m trainer.jobs.torchrun ARGS``: torchrun (torch.distributed.run, same arguments) that
ends with the trainer which started it, so a trainer killed outright leaves no training behind
(the restarted trainer resumes the job from its checkpoint). On SIGTERM torchrun's agent stops
every rank, then exits.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

from refit.settings import declare

PR_SET_PDEATHSIG = 1  # linux/prctl.h
TRAINER_PID = declare(
    "REFIT_TRAINER_PID",
    None,
    "internal: set by the trainer for each torchrun it starts, which exits once that process ends",
    parse=int,
)


def die_with_parent(sig: signal.Signals) -> None:
    """Linux delivers ``sig`` to this process when the thread that started it ends."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")


def main() -> None:
    die_with_parent(signal.SIGTERM)
    trainer = TRAINER_PID.value(os.environ)
    if trainer is not None and os.getppid() != trainer:
        sys.exit("trainer.jobs.torchrun: the process that started this job has ended")
    from torch.distributed.run import main as torchrun

    torchrun()  # reads sys.argv[1:]


if __name__ == "__main__":
    main()
