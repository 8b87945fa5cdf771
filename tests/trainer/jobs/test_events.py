"""Following a job through the event log (subscribing: tests/trainer/test_server.py)."""

from __future__ import annotations

import threading

from tests.trainer.jobs.fakes import request, wait_state
from trainer.jobs.records import (
    PUBLISHING,
    SUCCEEDED,
    TRAINING,
)


def test_follow_yields_snapshot_then_changes_until_the_end(manager, runner) -> None:
    job = manager.submit(request("a"))
    events = manager.follow(job.id, lambda: True)
    kind, first = next(events)  # taken here: the runner holds the job until released below
    seen = [(kind, first.state)]
    follower = threading.Thread(target=lambda: seen.extend((k, r.state) for k, r in events))
    follower.start()
    wait_state(manager, job.id, TRAINING)
    runner.release.set()
    follower.join(10)
    assert seen[0][0] == "snapshot" and first.state not in (PUBLISHING, SUCCEEDED)
    assert seen[-1] == ("state", SUCCEEDED)
    assert [s for _, s in seen][-2:] == [PUBLISHING, SUCCEEDED]
