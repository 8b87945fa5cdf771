"""The job event log that watchers follow: every state, detail and progress change, in order.

It shares the job manager's condition on purpose: each event is appended under the same lock as
the record change it reports, which is what keeps watchers from seeing changes out of order.
``append`` and ``cursor`` are called with that lock held; ``after`` takes it itself.
"""

from __future__ import annotations

import copy
import functools
import threading
from collections import deque
from collections.abc import Callable, Iterator

from refit.errors import Unavailable
from trainer.jobs.records import JobRecord

EVENT_LOG_SIZE = 4096  # a watcher slower than this many events skips the oldest


class EventLog:
    def __init__(self, cond: threading.Condition, stopped: threading.Event) -> None:
        self._cond, self._stopped = cond, stopped
        self._size = EVENT_LOG_SIZE
        self._events: deque[tuple[int, str, JobRecord]] = deque(maxlen=self._size)
        self._seq = 0

    @property
    def cursor(self) -> int:
        """Lock held. The sequence number of the latest event."""
        return self._seq

    def append(self, kind: str, record: JobRecord) -> None:
        """Lock held. Records a copy of ``record`` as it is now and wakes the watchers."""
        self._seq += 1
        self._events.append((self._seq, kind, copy.deepcopy(record)))
        self._cond.notify_all()

    def after(
        self, cursor: int, alive: Callable[[], bool], *, gapless: bool = False
    ) -> Iterator[tuple[str, JobRecord]]:
        """The events after ``cursor``, waiting for more while ``alive()`` and not stopped.
        ``gapless``: raise ``Unavailable`` rather than skip events the log no longer holds."""
        while alive() and not self._stopped.is_set():
            with self._cond:
                self._cond.wait_for(functools.partial(self._news_after, cursor), timeout=1)
                new = [e for e in self._events if e[0] > cursor]
                if gapless and new and new[0][0] > cursor + 1:
                    raise Unavailable(
                        f"the subscriber fell more than {self._size} job events behind; "
                        "subscribe again"
                    )
                cursor = self._seq
            for _, kind, record in new:
                yield kind, record

    def _news_after(self, cursor: int) -> bool:
        return self._seq > cursor or self._stopped.is_set()
