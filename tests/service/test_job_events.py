"""JobHub's fan-out, unit-tested against a scripted trainer (pure logic; the real trainer and
service run in tests/service/test_job_watchers.py): snapshot then ordered events, the end after
the final state, jobs the hub does not hold, slow watchers, and a broken subscription."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterator

import grpc
import pytest

from refit.errors import RefitError, Unavailable
from refit.trainer.v1 import trainer_pb2
from refit.v1 import refit_pb2 as pb
from service.job_events import JobHub, Watcher
from service.trainer_client import TrainerError

TIMEOUT_S = 10.0


def job(state: int, batch: int = 0, job_id: str = "job-a") -> pb.Job:
    return pb.Job(id=job_id, model="m", state=state, progress=pb.EpochProgress(batch=batch))


def event(kind: str, record: pb.Job) -> trainer_pb2.SubscribeResponse:
    return trainer_pb2.SubscribeResponse(event=pb.JobEvent(kind=kind, job=record))


def active(*records: pb.Job) -> trainer_pb2.SubscribeResponse:
    return trainer_pb2.SubscribeResponse(active=trainer_pb2.ActiveJobs(jobs=records))


class ScriptedStream:
    """A subscription the test feeds; ``drain()`` waits until the hub has applied all of it
    (the hub applies a message fully before it asks for the next)."""

    def __init__(self) -> None:
        self._items: deque = deque()
        self._cond = threading.Condition()
        self._waiting = False
        self.cancelled = False

    def push(self, *items: object) -> ScriptedStream:
        with self._cond:
            self._items.extend(items)
            self._cond.notify_all()
        return self

    def cancel(self) -> None:
        with self._cond:
            self.cancelled = True
            self._cond.notify_all()

    def drain(self) -> None:
        with self._cond:
            assert self._cond.wait_for(lambda: self._waiting and not self._items, TIMEOUT_S)

    def __iter__(self) -> Iterator[trainer_pb2.SubscribeResponse]:
        while True:
            with self._cond:
                self._waiting = True
                self._cond.notify_all()
                self._cond.wait_for(lambda: self._items or self.cancelled)
                self._waiting = False
                if self.cancelled:
                    raise TrainerError("the subscription was cancelled", grpc.StatusCode.CANCELLED)
                item = self._items.popleft()
            if isinstance(item, Exception):
                raise item
            yield item


class ScriptedTrainer:
    """What JobHub calls on TrainerClient: subscriptions the test feeds, and GetJob answers
    (``answers[id]``: taken in turn, the last one repeated; absent: NOT_FOUND)."""

    def __init__(self) -> None:
        self.streams: list[ScriptedStream] = []
        self.answers: dict[str, deque] = {}
        self._cond = threading.Condition()

    def subscribe(self) -> ScriptedStream:
        with self._cond:
            self.streams.append(ScriptedStream())
            self._cond.notify_all()
            return self.streams[-1]

    def messages(self, call: ScriptedStream) -> Iterator[trainer_pb2.SubscribeResponse]:
        yield from call

    def get_job(self, job_id: str) -> pb.Job:
        answers = self.answers.get(job_id)
        if not answers:
            raise TrainerError(f"no job {job_id!r}", grpc.StatusCode.NOT_FOUND)
        answer = answers.popleft() if len(answers) > 1 else answers[0]
        if isinstance(answer, Exception):
            raise answer
        return answer

    def answer(self, job_id: str, *answers: object) -> None:
        self.answers[job_id] = deque(answers)

    def subscription(self, number: int) -> ScriptedStream:
        """The ``number``-th subscription (1: the first), once the hub has opened it."""
        with self._cond:
            assert self._cond.wait_for(lambda: len(self.streams) >= number, TIMEOUT_S)
            return self.streams[number - 1]


class Reader:
    """Reads a watcher on its own thread, as a WatchJob call does."""

    def __init__(self, watcher: Watcher) -> None:
        self.events: list[pb.JobEvent] = []
        self.error: RefitError | None = None
        self._cond = threading.Condition()
        self._done = False
        threading.Thread(target=self._read, args=(watcher,), daemon=True).start()

    def _read(self, watcher: Watcher) -> None:
        try:
            for item in watcher:
                with self._cond:
                    self.events.append(item)
                    self._cond.notify_all()
        except RefitError as exc:
            self.error = exc
        with self._cond:
            self._done = True
            self._cond.notify_all()

    def wait_for(self, count: int) -> list[pb.JobEvent]:
        with self._cond:
            assert self._cond.wait_for(lambda: len(self.events) >= count, TIMEOUT_S)
            return list(self.events)

    def ended(self) -> list[pb.JobEvent]:
        with self._cond:
            assert self._cond.wait_for(lambda: self._done, TIMEOUT_S), self.events
            return list(self.events)


def seen(events: list[pb.JobEvent]) -> list[tuple[str, int, int]]:
    return [(e.kind, e.job.state, e.job.progress.batch) for e in events]


@pytest.fixture
def trainer() -> ScriptedTrainer:
    return ScriptedTrainer()


@pytest.fixture
def refreshes() -> list[int]:
    return []


def start_hub(trainer: ScriptedTrainer, refreshes: list[int], **options: object) -> JobHub:
    hub = JobHub(trainer, on_success=lambda: refreshes.append(1), retry_s=0.01, **options)
    threading.Thread(target=hub.run_forever, daemon=True).start()
    return hub


@pytest.fixture
def hub(trainer: ScriptedTrainer, refreshes: list[int]) -> Iterator[JobHub]:
    hub = start_hub(trainer, refreshes)
    yield hub
    hub.close()


def test_a_watcher_gets_the_snapshot_then_the_jobs_events_in_order_until_it_ends(
    hub, trainer, refreshes
) -> None:
    stream = trainer.subscription(1).push(active(job(pb.TRAINING), job(pb.QUEUED, job_id="b")))
    stream.drain()
    reader = Reader(hub.watch("job-a"))
    stream.push(
        event("progress", job(pb.TRAINING, 1)),
        event("progress", job(pb.QUEUED, job_id="b")),  # another job's: not this watcher's
        event("state", job(pb.PUBLISHING, 1)),
        event("state", job(pb.SUCCEEDED, 1)),
        event("state", job(pb.SUCCEEDED, 1)),  # after the end: nothing more is delivered
    )
    assert seen(reader.ended()) == [
        ("snapshot", pb.TRAINING, 0),
        ("progress", pb.TRAINING, 1),
        ("state", pb.PUBLISHING, 1),
        ("state", pb.SUCCEEDED, 1),
    ]
    assert reader.error is None
    assert len(refreshes) == 2  # once per SUCCEEDED event: the catalog learns the version


def test_the_catalog_is_refreshed_before_success_is_delivered(trainer, refreshes) -> None:
    delivered_before_refresh: list[bool] = []
    hub = JobHub(trainer, on_success=lambda: delivered_before_refresh.append(bool(reader.events)))
    threading.Thread(target=hub.run_forever, daemon=True).start()
    try:
        stream = trainer.subscription(1).push(active(job(pb.PUBLISHING)))
        stream.drain()
        reader = Reader(hub.watch("job-a"))
        reader.wait_for(1)  # the snapshot
        stream.push(event("state", job(pb.SUCCEEDED)))
        assert [e.job.state for e in reader.ended()] == [pb.PUBLISHING, pb.SUCCEEDED]
        assert delivered_before_refresh == [True]  # only the snapshot had gone out
    finally:
        hub.close()


def test_an_ended_job_gets_its_record_and_the_stream_ends(hub, trainer) -> None:
    trainer.subscription(1).push(active()).drain()
    trainer.answer("job-a", job(pb.FAILED))
    assert seen(Reader(hub.watch("job-a")).ended()) == [("snapshot", pb.FAILED, 0)]


def test_an_unknown_job_is_not_found(hub, trainer) -> None:
    trainer.subscription(1).push(active()).drain()
    with pytest.raises(RefitError) as caught:
        hub.watch("job-nope")
    assert caught.value.code == grpc.StatusCode.NOT_FOUND


def test_an_unreachable_trainer_is_unavailable(trainer, refreshes) -> None:
    hub = JobHub(trainer, on_success=lambda: None)  # never subscribed: nothing cached
    trainer.answer("job-a", Unavailable("the trainer at 127.0.0.1:9 is unreachable"))
    with pytest.raises(Unavailable):
        hub.watch("job-a")


def test_a_job_the_hub_has_not_seen_yet_gets_the_hubs_next_record_as_snapshot(hub, trainer) -> None:
    stream = trainer.subscription(1).push(active())
    stream.drain()
    trainer.answer("job-a", job(pb.LOADING_DATA))  # ahead of the hub: its events are on the way
    reader = Reader(hub.watch("job-a"))
    stream.push(
        event("state", job(pb.QUEUED)),  # older than what GetJob said: still the first seen
        event("state", job(pb.LOADING_DATA)),
        event("state", job(pb.CANCELLED)),
    )
    assert seen(reader.ended()) == [
        ("snapshot", pb.QUEUED, 0),
        ("state", pb.LOADING_DATA, 0),
        ("state", pb.CANCELLED, 0),
    ]


def test_a_job_that_ends_while_its_watcher_registers_is_not_waited_for_forever(
    hub, trainer
) -> None:
    trainer.subscription(1).push(active()).drain()
    # Running at the first read, ended (its events gone by) before the watcher was registered.
    trainer.answer("job-a", job(pb.TRAINING), job(pb.SUCCEEDED))
    assert seen(Reader(hub.watch("job-a")).ended()) == [("snapshot", pb.SUCCEEDED, 0)]


def test_a_slow_watcher_skips_to_the_latest_record_and_holds_no_one_up(trainer, refreshes) -> None:
    hub = start_hub(trainer, refreshes, buffer=4)
    try:
        stream = trainer.subscription(1).push(active(job(pb.TRAINING)))
        stream.drain()
        slow = hub.watch("job-a")  # nobody reads it until the end
        fast = Reader(hub.watch("job-a"))
        for first, last in ((1, 4), (5, 8), (9, 10)):  # no more at once than `fast` buffers
            stream.push(*(event("progress", job(pb.TRAINING, b)) for b in range(first, last + 1)))
            stream.drain()  # the hub went through them: the slow watcher did not block it
            fast.wait_for(last + 1)
        assert [e.job.progress.batch for e in fast.wait_for(11)] == list(range(11))
        stream.push(event("state", job(pb.SUCCEEDED, 10)))
        late = Reader(slow).ended()
        assert slow.skips == 2
        assert seen(late) == [
            ("snapshot", pb.TRAINING, 8),  # fell behind: the newest record stands for the rest
            ("progress", pb.TRAINING, 9),
            ("progress", pb.TRAINING, 10),
            ("state", pb.SUCCEEDED, 10),
        ]
    finally:
        hub.close()


def test_watchers_go_on_after_the_subscription_breaks(hub, trainer) -> None:
    b = "job-b"
    stream = trainer.subscription(1).push(active(job(pb.TRAINING, 1), job(pb.TRAINING, job_id=b)))
    stream.drain()
    a_reader, b_reader = Reader(hub.watch("job-a")), Reader(hub.watch(b))
    a_reader.wait_for(1)
    stream.push(Unavailable("the trainer at 127.0.0.1:9 is unreachable"))
    # While it is away: a new watcher of a running job is read with GetJob and waits too.
    trainer.answer("job-c", job(pb.TRAINING, job_id="job-c"))
    c_reader = Reader(hub.watch("job-c"))
    # Back: job-a went on, job-b ended meanwhile, job-c still runs.
    trainer.answer(b, job(pb.SUCCEEDED, job_id=b))
    again = trainer.subscription(2)
    again.push(active(job(pb.TRAINING, 5), job(pb.TRAINING, 2, job_id="job-c"))).drain()
    again.push(event("state", job(pb.SUCCEEDED, 5)), event("state", job(pb.FAILED, job_id="job-c")))
    assert seen(a_reader.ended()) == [
        ("snapshot", pb.TRAINING, 1),
        ("snapshot", pb.TRAINING, 5),  # a fresh snapshot after the reconnection
        ("state", pb.SUCCEEDED, 5),
    ]
    assert seen(b_reader.ended()) == [("snapshot", pb.TRAINING, 0), ("snapshot", pb.SUCCEEDED, 0)]
    assert seen(c_reader.ended()) == [("snapshot", pb.TRAINING, 2), ("state", pb.FAILED, 0)]
    assert hub.subscriptions == 2


def test_a_closed_watcher_leaves_the_hub(hub, trainer) -> None:
    stream = trainer.subscription(1).push(active(job(pb.TRAINING)))
    stream.drain()
    watcher = hub.watch("job-a")
    watcher.close()  # the caller went away
    stream.push(event("state", job(pb.SUCCEEDED))).drain()
    assert list(watcher) == []
    assert hub._watchers == {}


def test_closing_the_hub_ends_every_watch_with_unavailable(trainer, refreshes) -> None:
    hub = start_hub(trainer, refreshes)
    stream = trainer.subscription(1).push(active(job(pb.TRAINING)))
    stream.drain()
    reader = Reader(hub.watch("job-a"))
    reader.wait_for(1)
    hub.close()
    assert seen(reader.ended()) == [("snapshot", pb.TRAINING, 0)]
    assert isinstance(reader.error, Unavailable) and "watch the job again" in reader.error.message
    assert stream.cancelled
