"""The client of every TorchServe replica; see the package docstring."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

from refit.errors import DeadlineExceeded, NotFound, RefitError, Unavailable
from refit.registry import Batching
from refit.torchserve.calls import CallObserver, ModelNotLoaded, NoWorker, QueueFull
from refit.torchserve.keys import KeyRing, KeySource, NoKeys
from refit.torchserve.replica import ReplicaClient, ServedVersion
from refit.torchserve.targets import Targets
from refit.torchserve_api import inference_pb2


class TorchServeClient:
    """Every TorchServe replica: Predicts spread over those in rotation, management fanned out."""

    def __init__(
        self,
        inference_target: str,
        management_target: str,
        *,
        timeout_s: float = 10.0,
        register_timeout_s: float = 180.0,
        observe: CallObserver | None = None,
        management_rest: str = "",
        metrics: str = "",
        keys: KeySource | None = None,
    ) -> None:
        self.observe = observe or (lambda call, seconds, error: None)
        self.timeout_s = timeout_s
        self.register_timeout_s = register_timeout_s
        self.targets = Targets.parse(inference_target, management_target, management_rest, metrics)
        self.keys = KeyRing(keys or NoKeys())
        self._lock = threading.Lock()
        self._replicas: dict[str, ReplicaClient] = {}
        self._rotation: list[ReplicaClient] | None = None  # None: every replica, until told
        self._turn = 0

    def close(self) -> None:
        with self._lock:
            replicas = list(self._replicas.values())
            self._replicas.clear()
        for replica in replicas:
            replica.close()

    # --- replicas ----------------------------------------------------------------------------

    def replicas(self) -> list[ReplicaClient]:
        """A client per replica, as the targets name them now (a DNS name is re-resolved)."""
        replicas = self.targets.replicas()
        gone = []
        with self._lock:
            for replica in replicas:
                if replica.name not in self._replicas:
                    self._replicas[replica.name] = ReplicaClient(replica, self)
            for name in set(self._replicas) - {r.name for r in replicas}:
                gone.append(self._replicas.pop(name))
            clients = [self._replicas[r.name] for r in replicas]
        for client in gone:
            client.close()
        return clients

    def set_rotation(self, replicas: Sequence[ReplicaClient]) -> None:
        """Sends Predicts to ``replicas`` only (those holding every default); none named: all."""
        rotation = list(replicas) or self.replicas()
        with self._lock:
            self._rotation = rotation

    def _in_turn(self) -> list[ReplicaClient]:
        """The replicas in rotation, starting with the next one's turn (round robin)."""
        with self._lock:
            rotation, turn = self._rotation, self._turn
            self._turn += 1
        if rotation is None:
            rotation = self.replicas()
        if not rotation:
            return []
        turn %= len(rotation)
        return rotation[turn:] + rotation[:turn]

    # --- inference (spread over the replicas in rotation) ---------------------------------------

    def predict(
        self, model: str, version: str, image: bytes, top_k: int, timeout_s: float | None = None
    ) -> dict:
        """Runs the refit handler on one image on the next replica in rotation; returns its JSON
        answer. A replica that cannot be reached is followed by the next one, once."""
        request = inference_pb2.PredictionsRequest(
            model_name=model, model_version=version, input={"data": image, "top_k": b"%d" % top_k}
        )
        timeout = self.timeout_s if timeout_s is None else min(self.timeout_s, timeout_s)
        deadline = time.monotonic() + timeout
        replicas = self._in_turn()[:2]
        if not replicas:
            raise Unavailable(f"{self.targets.dns_name} resolves to no address; retry shortly")
        for attempt, replica in enumerate(replicas):
            left = deadline - time.monotonic()
            if left <= 0:
                raise DeadlineExceeded(f"deadline passed before {model} v{version} was asked")
            try:
                response = replica.predict(request, left)
            except Unavailable:
                if attempt + 1 < len(replicas):
                    continue
                raise
            except NoWorker as exc:
                served = _with_a_worker(replica, model, version)
                if served is None:
                    raise
                raise QueueFull(
                    f"TorchServe's queue for {model} v{version} is full (job_queue_size="
                    f"{served.job_queue_size}); retry with backoff"
                ) from exc
            except RefitError as exc:
                # Past the deadline TorchServe may end the stream (CANCELLED) before the
                # client's own timer reads DEADLINE_EXCEEDED: it is the deadline all the same.
                if time.monotonic() < deadline or isinstance(exc, DeadlineExceeded):
                    raise
                raise DeadlineExceeded(
                    f"TorchServe did not answer predict for {model} v{version} in time ({exc})"
                ) from exc
            return json.loads(response.prediction)
        raise AssertionError("unreachable")

    def ping(self) -> bool:
        """Whether the next replica in rotation says it is healthy."""
        replicas = self._in_turn()
        return bool(replicas) and replicas[0].ping()

    # --- management (every replica) ------------------------------------------------------------

    def describe(self, model: str, version: str) -> list[ServedVersion | None]:
        """The version on every replica (None where it is not held); any replica that does not
        answer raises."""
        return [replica.describe(model, version) for replica in self.replicas()]

    def inference_counts(self) -> dict[str, dict[tuple[str, str], float]]:
        """Every replica's inference counters (``ReplicaClient.inference_counts``), by replica
        name. All or none: a replica whose counters cannot be read raises, since a decision on
        the others' alone would miss the Predicts it took."""
        replicas = self.replicas()
        if not replicas:
            raise Unavailable(f"{self.targets.dns_name} resolves to no address; retry shortly")
        return {replica.name: replica.inference_counts() for replica in replicas}

    def served_versions(self) -> list[ServedVersion]:
        """What any reachable replica serves (a version counts once, by its first replica)."""
        served: dict[tuple[str, str], ServedVersion] = {}
        for versions in self._each_replica("list models", lambda r: r.served_versions()):
            for v in versions:
                served.setdefault((v.model, v.version), v)
        return list(served.values())

    def register(
        self,
        model: str,
        version: str,
        url: str,
        *,
        batching: Batching | None = None,
        workers: int = 1,
    ) -> None:
        """Loads the archive at ``url`` on every reachable replica that lacks the version, with
        the version's batching settings and ``workers`` workers."""
        self._each_replica(
            f"register {model} v{version}",
            lambda r: r.ensure(model, version, url, batching, workers),
        )

    def scale(self, model: str, version: str, workers: int, timeout_s: float) -> None:
        """Runs ``workers`` workers for the version on every reachable replica, in parallel;
        returns once they are up (scaling up starts a worker process: seconds)."""

        def scale(replica: ReplicaClient) -> bool:
            try:
                replica.scale(model, version, workers, timeout_s)
            except NotFound:
                return False  # not registered there yet: the reconciler registers it
            return True

        what = f"scale {model} v{version} to {workers} workers"
        if not any(self._each_replica(what, scale, parallel=True)):
            raise ModelNotLoaded(f"{model} v{version} is published but not loaded yet; retry")

    def set_default(self, model: str, version: str) -> None:
        self._each_replica(
            f"set {model} v{version} default", lambda r: r.set_default(model, version)
        )

    def unregister(self, model: str, version: str) -> None:
        """Unloads the version everywhere; NotFound only when no replica held it."""

        def unload(replica: ReplicaClient) -> bool:
            try:
                replica.unregister(model, version)
            except NotFound:
                return False
            return True

        if not any(self._each_replica(f"unregister {model} v{version}", unload)):
            raise NotFound(f"no TorchServe replica holds {model} v{version}")

    def _each_replica(
        self, what: str, action: Callable[[ReplicaClient], object], parallel: bool = False
    ) -> list:
        """Runs ``action`` on every replica (``parallel``: at once); returns the answers of those
        reached. Unreachable replicas are skipped (the service's reconciler brings them in line
        when they answer again) unless none was reached. Any other failure is raised."""
        answers, unreachable = [], []
        replicas = self.replicas()

        def attempt(replica: ReplicaClient) -> tuple[object, Unavailable | None]:
            try:
                return action(replica), None
            except Unavailable as exc:
                return None, exc

        if parallel and len(replicas) > 1:
            with ThreadPoolExecutor(len(replicas), thread_name_prefix="replicas") as pool:
                outcomes = list(pool.map(attempt, replicas))
        else:
            outcomes = [attempt(replica) for replica in replicas]
        for replica, (answer, failure) in zip(replicas, outcomes, strict=True):
            if failure is None:
                answers.append(answer)
            else:
                unreachable.append(f"{replica.name}: {failure.message}")
        if not answers:
            where = "; ".join(unreachable) or f"{self.targets.dns_name} resolves to no address"
            raise Unavailable(f"no TorchServe replica answered ({what}): {where}; retry shortly")
        return answers


def _with_a_worker(replica: ReplicaClient, model: str, version: str) -> ServedVersion | None:
    """TorchServe 0.12 refuses a request with one answer ("has no worker") both when the version
    runs no worker and when its job queue is full (``ModelManager.addJob``): the version as the
    replica that refused describes it, when it lists a worker there (then the queue was full);
    None when it lists none or cannot tell (then a start is the remedy, harmless either way)."""
    try:
        served = replica.describe(model, version)
    except RefitError:
        return None
    return served if served is not None and served.workers else None
