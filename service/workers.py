"""Which published versions hold a TorchServe worker: started on demand, stopped when idle.

A worker is a Python process with torch loaded (about 0.33 GiB of its own memory here, see
docs/user-guide.md *Workers*), so a worker per published version makes memory grow with every
retrain. Instead:

- each model's default keeps its worker, and a newly published version keeps the one its
  publisher started for ``candidate_warm_s`` (the promotion gate, a first evaluation);
- every other version is registered without a worker (the reconciler does so);
- a Predict naming a version without a worker starts one (TorchServe ScaleWorker, synchronous,
  on every replica) and then goes on; concurrent first calls share that one start, and each waits
  at most ``scale_up_timeout_s`` (or its own deadline) before failing UNAVAILABLE;
- a version that is not a default and got no Predict for ``idle_s`` goes back to 0 workers;
  a Predict in flight through this service always keeps its version's worker;
- at most ``max_warm`` versions hold a worker (0: no bound): starting one more first stops
  others, least recently used first, in the order of service/worker_budget.py: a predict caller
  naming old versions can neither evict the defaults nor a candidate in its promotion gate; when
  that cannot make room the Predict fails RESOURCE_EXHAUSTED and nothing is stopped. A publish
  whose new version loses its worker to a default starts it again for its smoke test
  (refit.publish).

Use, for idleness and for the least recently used, is read from TorchServe itself when
REFIT_TORCHSERVE_METRICS is set (``SharedUse``, service/worker_use.py), so every service replica
judges it the same way; without it, from this replica's own Predicts, with a warning at start.

The rest of the state is this service's view, rebuilt from TorchServe on every reconcile pass
(``observe``); a version it has not seen yet is assumed to have a worker, and a Predict that
finds none (``lost``) starts one and is retried once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import contextmanager
from dataclasses import dataclass, field

from refit.errors import DeadlineExceeded, RefitError, ResourceExhausted, Unavailable
from refit.torchserve import TorchServeClient
from service import metrics
from service.worker_budget import Budget
from service.worker_use import Key, SharedUse

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerPolicy:
    idle_s: float = 300.0  # REFIT_IDLE_WORKER_S
    candidate_warm_s: float = 600.0  # REFIT_CANDIDATE_WARM_S
    max_warm: int = 10  # REFIT_MAX_WARM_WORKERS; 0: no bound
    scale_up_timeout_s: float = 60.0  # REFIT_SCALE_UP_TIMEOUT_S


@dataclass
class _Move:
    """A start (up) or stop of one version's workers, in progress; callers wait on ``done``."""

    up: bool
    done: Future = field(default_factory=Future)
    admitted: bool = False  # a start the budget has made room for (it counts as warm)


@dataclass(frozen=True)
class Observation:
    """What a reconcile pass saw on the reachable replicas."""

    registered: set[Key]  # held by some replica
    holding: set[Key]  # with a worker on some replica
    ready: set[Key]  # with a worker on every replica
    defaults: set[Key]
    created: dict[Key, float]  # wall-clock publication time (epoch seconds)


class Workers:
    def __init__(
        self,
        torchserve: TorchServeClient,
        policy: WorkerPolicy | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.torchserve = torchserve
        self.policy = policy or WorkerPolicy()
        self.budget = Budget(self.policy.max_warm)
        self.clock, self.wall = clock, wall
        self.can_stop = bool(torchserve.targets.rest)  # scaling to 0 needs the REST API
        self.shares_use = bool(torchserve.targets.metrics)  # TorchServe's counters tell use
        self._lock = threading.Lock()
        self._registered: set[Key] = set()
        self._holding: set[Key] = set()
        self._ready: set[Key] = set()
        self._defaults: set[Key] = set()
        self._created: dict[Key, float] = {}
        self._last_used: dict[Key, float] = {}
        self._moves: dict[Key, _Move] = {}
        self._in_flight: Counter[Key] = Counter()
        self.use = SharedUse(torchserve, self.policy, clock, wall)
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="scale")
        if not self.can_stop:
            log.warning(
                "REFIT_TORCHSERVE_MANAGEMENT_REST is not set: versions started on demand keep "
                "their workers (TorchServe's gRPC API cannot scale to 0)"
            )
        elif not self.shares_use:
            log.warning(
                "REFIT_TORCHSERVE_METRICS is not set: idleness is judged from this replica's "
                "own Predicts, so a version used only through another service replica may be "
                "stopped here"
            )

    # --- the Predict path ------------------------------------------------------------------------

    @contextmanager
    def serving(self, model: str, version: str, timeout_s: float | None = None) -> Iterator[None]:
        """Around one Predict: the version has a worker (``ensure``), and no idle or budget stop
        picks it until the Predict is answered (a stop would strand it in TorchServe's queue)."""
        key = (model, version)
        with self._lock:
            self._in_flight[key] += 1
        try:
            self.ensure(model, version, timeout_s)
            yield
        finally:
            with self._lock:
                self._in_flight[key] -= 1
                if not self._in_flight[key]:
                    del self._in_flight[key]
                self._last_used[key] = self.clock()

    def ensure(self, model: str, version: str, timeout_s: float | None = None) -> None:
        """Returns once the version has a worker: at once when it has one (or this service has
        not seen it yet); otherwise after starting one, shared by every concurrent caller."""
        key = (model, version)
        limit = self.policy.scale_up_timeout_s
        deadline = self.clock() + (limit if timeout_s is None else min(limit, timeout_s))
        while True:
            with self._lock:
                self._last_used[key] = self.clock()
                if key in self._ready or key not in self._registered:
                    return
                move = self._moves.get(key)
                if move is None:
                    move = self._moves[key] = _Move(up=True)
                    self._pool.submit(self._start, key, move)
            client_bound = timeout_s is not None and timeout_s < limit
            self._wait(key, move, deadline, client_bound)
            if move.up:
                return

    def lost(self, model: str, version: str) -> None:
        """A Predict found no worker (another service scaled it down, TorchServe restarted)."""
        with self._lock:
            self._ready.discard((model, version))
            self._holding.discard((model, version))
            self._registered.add((model, version))

    def _wait(self, key: Key, move: _Move, deadline: float, client_bound: bool) -> None:
        model, version = key
        try:
            move.done.result(timeout=max(deadline - self.clock(), 0.0))
        except FutureTimeout:
            if client_bound:
                raise DeadlineExceeded(
                    f"deadline passed while {model} v{version} was starting its worker "
                    f"(a cold start takes seconds); retry, or allow a longer deadline"
                ) from None
            raise Unavailable(
                f"{model} v{version} had no worker and none started within "
                f"{self.policy.scale_up_timeout_s:.0f}s; retry shortly"
            ) from None
        except DeadlineExceeded as exc:
            raise Unavailable(
                f"{model} v{version} had no worker and none started within "
                f"{self.policy.scale_up_timeout_s:.0f}s ({exc.message}); retry shortly"
            ) from exc

    def _start(self, key: Key, move: _Move) -> None:
        start = self.clock()
        try:
            self._make_room(key)
            self.torchserve.scale(*key, 1, timeout_s=self.policy.scale_up_timeout_s)
        except ResourceExhausted as exc:  # the budget's refusal (_over_budget): not a failure
            metrics.PREDICT_REFUSALS.labels("worker_budget").inc()
            log.info("%s", exc.message)
            self._finish(key, move, error=exc)
            return
        except BaseException as exc:
            outcome = "timeout" if isinstance(exc, DeadlineExceeded) else "failed"
            metrics.WORKER_SCALE_UPS.labels(outcome).inc()
            log.warning("starting a worker for %s v%s failed: %s", *key, exc)
            self._finish(key, move, error=exc)
            return
        seconds = self.clock() - start
        metrics.WORKER_SCALE_UPS.labels("ok").inc()
        metrics.WORKER_SCALE_UP_SECONDS.observe(seconds)
        log.info("started a worker for %s v%s in %.1fs", *key, seconds)
        with self._lock:
            self._holding.add(key)
            self._ready.add(key)
        self._finish(key, move)

    def _finish(self, key: Key, move: _Move, error: BaseException | None = None) -> None:
        with self._lock:
            if self._moves.get(key) is move:
                del self._moves[key]
            metrics.WARM_VERSIONS.set(len(self._holding))
        if error is None:
            move.done.set_result(None)
        else:
            move.done.set_exception(error)

    # --- stopping --------------------------------------------------------------------------------

    def _make_room(self, key: Key) -> None:
        """Under ``max_warm``: stops the least recently used versions to make room for ``key``."""
        for victim in self._over_budget(extra=key):
            self._stop(victim, "budget")

    def _over_budget(self, extra: Key | None = None) -> list[Key]:
        """The versions to stop (claimed) so that at most ``max_warm`` hold a worker with
        ``extra`` started (service/worker_budget.py); ResourceExhausted, and nothing is claimed,
        when ``extra`` cannot be made room for."""
        if not self.policy.max_warm or not self.can_stop:
            return []
        with self._lock:
            # Starts not admitted yet wait for this decision (one at a time, under the lock):
            # counting them would make two concurrent starts each refuse for the other.
            starting = {k for k, move in self._moves.items() if move.up and move.admitted}
            stopping = {k for k, move in self._moves.items() if not move.up}
            victims = self.budget.victims(
                warm=(self._holding - stopping) | starting | ({extra} if extra else set()),
                stoppable=self._holding - {extra} - set(self._moves) - set(self._in_flight),
                extra=extra,
                defaults=self._defaults,
                young=self._young(self.wall()),
                last_used=self._last_used,
            )
            self._claim(victims)
            if extra in self._moves:
                self._moves[extra].admitted = True
        return victims

    def _idle(self) -> list[Key]:
        """Versions to stop as idle (claimed). With the shared counters, each is first checked
        for a worker start on some replica (``_unused_by_a_start``)."""
        if not self.can_stop:
            return []
        with self._lock:
            idle = self._idle_now()
        if self.shares_use and idle:
            idle = [key for key in idle if self._unused_by_a_start(key)]
        with self._lock:
            victims = [key for key in self._idle_now() if key in idle]
            self._claim(victims)
        return victims

    def _idle_now(self) -> list[Key]:
        """Under the lock: versions that are not defaults, young candidates, moving or in a
        Predict, with no use for ``idle_s``."""
        now = self.clock()
        young = self._young(self.wall())
        return [
            key
            for key in self._holding - self._defaults - set(self._moves) - set(self._in_flight)
            if now - self._last_used.get(key, now) >= self.policy.idle_s and key not in young
        ]

    def _unused_by_a_start(self, key: Key) -> bool:
        """True when no replica started the version's worker recently (``SharedUse``); False
        too when that cannot be told."""
        used = self.use.started(key)
        if used is None:
            return True
        if used is not False:
            with self._lock:
                self._last_used[key] = max(self._last_used.get(key, 0.0), used)
        return False

    def _young(self, wall: float) -> set[Key]:
        """Versions published within ``candidate_warm_s`` (being smoke-tested, gated, tried)."""
        return {
            key
            for key, created in self._created.items()
            if wall < created + self.policy.candidate_warm_s
        }

    def _claim(self, keys: list[Key]) -> None:
        """Marks versions as stopping (under the lock): Predicts now wait for the stop, then
        start them again, instead of racing it."""
        for key in keys:
            self._moves[key] = _Move(up=False)
            self._ready.discard(key)

    def _stop(self, key: Key, reason: str) -> None:
        move = self._moves[key]
        try:
            self.torchserve.scale(*key, 0, timeout_s=self.policy.scale_up_timeout_s)
        except RefitError as exc:
            log.warning("stopping the worker of %s v%s failed: %s", *key, exc.message)
            metrics.WORKER_SCALE_DOWNS.labels(reason, "failed").inc()
        else:
            log.info("stopped the worker of %s v%s (%s)", *key, reason)
            metrics.WORKER_SCALE_DOWNS.labels(reason, "ok").inc()
            with self._lock:
                self._holding.discard(key)
        self._finish(key, move)

    def stop_idle(self) -> int:
        """One round of housekeeping: idle versions (none when TorchServe's counters cannot be
        read), then the budget. Returns the stops made."""
        judged = self._read_use() if self.shares_use else True
        victims = [(key, "idle") for key in self._idle()] if judged else []
        victims += [(key, "budget") for key in self._over_budget()]
        for key, reason in victims:
            self._stop(key, reason)
        return len(victims)

    def _read_use(self) -> bool:
        """Marks as used now every version any service replica used since the last read; False
        when that cannot be told (then none may be judged idle)."""
        used = self.use.read()
        if used is None:
            return False
        now = self.clock()
        with self._lock:
            for model, version in used:
                if version == "default":  # TorchServe's label for a request naming no version
                    version = next((v for m, v in self._defaults if m == model), version)
                self._last_used[(model, version)] = now
        return True

    def run_forever(self, stop: threading.Event) -> None:
        interval = max(min(self.policy.idle_s / 4, 5.0), 0.1)
        while not stop.wait(interval):
            try:
                self.stop_idle()
            except Exception:
                log.exception("stopping idle workers failed")

    # --- the reconciler's view -------------------------------------------------------------------

    def observe(self, seen: Observation) -> None:
        """A reconcile pass's view of every replica; versions being started or stopped keep the
        state their move gives them."""
        now = self.clock()
        with self._lock:
            moving = set(self._moves)
            for key in seen.holding - self._holding:
                self._last_used.setdefault(key, now)
            self._registered = seen.registered | (self._registered & moving)
            self._holding = (seen.holding - moving) | (self._holding & moving)
            self._ready = (seen.ready - moving) | (self._ready & moving)
            self._defaults = set(seen.defaults)
            self._created = dict(seen.created)
            self._last_used = {k: t for k, t in self._last_used.items() if k in self._registered}
            metrics.WARM_VERSIONS.set(len(self._holding))

    def default_workers(self, replica_holding: int) -> int:
        """Workers to register a default with on a replica already running ``replica_holding``
        versions' workers: one, unless the budget is full (a Predict then starts it)."""
        if self.policy.max_warm and replica_holding >= self.policy.max_warm:
            return 0
        return 1

    def warm_defaults(self) -> None:
        """Starts, in the background, defaults without a worker while the budget has room
        (after a promotion of a cold version, or a budget that grew)."""
        with self._lock:
            cold = sorted(
                (k for k in self._defaults - self._ready if k in self._registered),
                key=lambda k: -self._last_used.get(k, 0.0),
            )
            room = len(cold)
            if self.policy.max_warm:
                room = self.policy.max_warm - len(self._holding | set(self._moves))
            for key in cold[: max(room, 0)]:
                if key in self._moves:
                    continue
                move = self._moves[key] = _Move(up=True)
                self._pool.submit(self._start, key, move)

    def holding(self) -> set[Key]:
        with self._lock:
            return set(self._holding)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
