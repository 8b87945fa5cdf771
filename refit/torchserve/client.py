"""The client that talks to TorchServe's replicas; see the package docstring."""

from __future__ import annotations

import contextlib
import json
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass

import grpc
from google.protobuf import empty_pb2

from refit.errors import DeadlineExceeded, FailedPrecondition, NotFound, RefitError, Unavailable
from refit.identifiers import VERSION
from refit.registry import Batching
from refit.torchserve.targets import Replica, Targets, balanced_target
from refit.torchserve_api import (
    inference_pb2,
    inference_pb2_grpc,
    management_pb2,
    management_pb2_grpc,
)

# (call name, seconds taken, gRPC code name of a failure or None): feeds each caller's metrics.
CallObserver = Callable[[str, float, str | None], None]
_CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", 64 << 20),
    ("grpc.max_receive_message_length", 64 << 20),
    ("grpc.keepalive_time_ms", 30_000),
]
# Round robin over the replicas; a Predict that fails with UNAVAILABLE (the replica died or is
# unreachable) is retried once, and round robin picks another replica for the retry. Other codes
# are answers (a bad image, a model not loaded there) and are not retried.
_PREDICT_SERVICE_CONFIG = json.dumps(
    {
        "loadBalancingConfig": [{"round_robin": {}}],
        "methodConfig": [
            {
                "name": [{"service": "org.pytorch.serve.grpc.inference.InferenceAPIsService"}],
                "retryPolicy": {
                    "maxAttempts": 2,
                    "initialBackoff": "0.01s",
                    "maxBackoff": "0.1s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ],
    }
)


class ModelNotLoaded(RefitError):
    """TorchServe does not (yet) serve a version the registry has: a reconcile is due."""

    code = grpc.StatusCode.UNAVAILABLE


class NoWorker(RefitError):
    """TorchServe holds the version but runs no worker for it (scaled to 0): scale it up."""

    code = grpc.StatusCode.UNAVAILABLE


@dataclass(frozen=True)
class ServedVersion:
    model: str
    version: str
    workers: int  # TorchServe 0.12's describe does not say which version is the default


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
    ) -> None:
        self.observe = observe or (lambda call, seconds, error: None)
        self.timeout_s = timeout_s
        self.register_timeout_s = register_timeout_s
        self.targets = Targets.parse(inference_target, management_target, management_rest)
        self._lock = threading.Lock()
        self._replicas: dict[str, ReplicaClient] = {}
        self._target = ""
        self._inference_channel: grpc.Channel | None = None
        self._inference: inference_pb2_grpc.InferenceAPIsServiceStub | None = None
        self._use_inference_target(self.targets.initial_inference_target())

    def close(self) -> None:
        with self._lock:
            channels = [self._inference_channel] + [r.channel for r in self._replicas.values()]
            self._replicas.clear()
        for channel in channels:
            channel.close()

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
            client.channel.close()
        return clients

    def set_rotation(self, replicas: Sequence[ReplicaClient]) -> None:
        """Sends Predicts to ``replicas`` only (those holding every default); none named: all."""
        addresses = [r.replica.inference for r in replicas]
        if not addresses:
            addresses = [r.replica.inference for r in self.replicas()]
        target = balanced_target(addresses) if addresses else self._target
        self._use_inference_target(target)

    @property
    def inference_target(self) -> str:
        return self._target

    def _use_inference_target(self, target: str) -> None:
        with self._lock:
            if target == self._target:
                return
            old = self._inference_channel
            options = [
                *_CHANNEL_OPTIONS,
                ("grpc.service_config", _PREDICT_SERVICE_CONFIG),
                # Own connections: gRPC otherwise shares them between channels, and a replica
                # that rejoins would wait out the backoff its old connection built while it was
                # down (up to 2 minutes) before the new channel could use it.
                ("grpc.use_local_subchannel_pool", 1),
                ("grpc.max_reconnect_backoff_ms", 5_000),
            ]
            self._inference_channel = grpc.insecure_channel(target, options)
            self._inference = inference_pb2_grpc.InferenceAPIsServiceStub(self._inference_channel)
            self._target = target
        if old is not None:
            # Calls in flight on the old channel finish first: close it once they must have.
            closer = threading.Timer(self.timeout_s + 5.0, old.close)
            closer.daemon = True
            closer.start()

    # --- inference (spread over the replicas in rotation) ---------------------------------------

    def predict(
        self, model: str, version: str, image: bytes, top_k: int, timeout_s: float | None = None
    ) -> dict:
        """Runs the refit handler on one image; returns its JSON answer."""
        request = inference_pb2.PredictionsRequest(
            model_name=model, model_version=version, input={"data": image, "top_k": b"%d" % top_k}
        )
        timeout = self.timeout_s if timeout_s is None else min(self.timeout_s, timeout_s)
        if timeout <= 0:
            raise DeadlineExceeded(f"deadline passed before {model} v{version} was asked")
        stub = self._inference
        with _call(self.observe, "predict", f"{model} v{version}"):
            response = stub.Predictions(request, timeout=timeout)
        return json.loads(response.prediction)

    def ping(self) -> bool:
        try:
            with _call(self.observe, "ping", "TorchServe"):
                answer = self._inference.Ping(empty_pb2.Empty(), timeout=2)
        except RefitError:
            return False
        return "Healthy" in answer.health

    # --- management (every replica) ------------------------------------------------------------

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


class ReplicaClient:
    """One replica's management API (the reconciler calls each replica on its own)."""

    def __init__(self, replica: Replica, owner: TorchServeClient) -> None:
        self.replica = replica
        self.name = replica.name
        self.owner = owner
        self.channel = grpc.insecure_channel(replica.management, _CHANNEL_OPTIONS)
        self._management = management_pb2_grpc.ManagementAPIsServiceStub(self.channel)

    def model_names(self) -> set[str]:
        with self._call("list_models", "TorchServe"):
            listing = self._management.ListModels(
                management_pb2.ListModelsRequest(limit=1000), timeout=self.owner.timeout_s
            )
        return {m["modelName"] for m in json.loads(listing.msg).get("models", [])}

    def served_versions(self) -> list[ServedVersion]:
        return [version for name in self.model_names() for version in self._describe(name)]

    def holds(self, model: str, version: str) -> bool:
        try:
            return any(v.version == version for v in self._describe(model))
        except NotFound:
            return False

    def _describe(self, model: str, version: str = "all") -> Iterator[ServedVersion]:
        request = management_pb2.DescribeModelRequest(model_name=model, model_version=version)
        with self._call("describe_model", model):
            answer = self._management.DescribeModel(request, timeout=self.owner.timeout_s)
        for entry in json.loads(answer.msg):
            yield ServedVersion(
                model=entry["modelName"],
                version=entry["modelVersion"],
                workers=len(entry.get("workers", [])),
            )

    def ensure(
        self,
        model: str,
        version: str,
        url: str,
        batching: Batching | None = None,
        workers: int = 1,
    ) -> None:
        """Registers the version unless this replica holds it already (also when another caller,
        e.g. a publisher beside the reconciler, registered it at the same moment)."""
        if self.holds(model, version):
            return
        try:
            self.register(model, url, workers=workers, batching=batching)
        except RefitError:
            if not self.holds(model, version):
                raise
        if not self.holds(model, version):
            self._withdraw_misread(model)
            raise RefitError(
                f"TorchServe loaded the archive at {url.split('?', 1)[0]} but not as {model} "
                f"v{version}: it is not a model archive of that version (its manifest is "
                "missing or names another version)"
            )

    def _withdraw_misread(self, model: str) -> None:
        """Unloads versions no refit record can name (an archive without a manifest loads
        as "1.0" when no worker starts to reject it)."""
        with contextlib.suppress(NotFound):
            for served in list(self._describe(model)):
                if not VERSION.fullmatch(served.version):
                    with contextlib.suppress(NotFound):
                        self.unregister(model, served.version)

    def register(
        self,
        model: str,
        url: str,
        *,
        workers: int = 1,
        batching: Batching | None = None,
    ) -> None:
        """Registers an archive from ``url`` and waits until its workers are up; ``batching``:
        the version's recorded settings (None: TorchServe's default, one request at a time).
        ``workers=0`` registers it without a worker when TorchServe runs with
        ``default_workers_per_model=0`` (refit's configuration): gRPC reads 0 as "unset"."""
        options = {"model_name": model, "initial_workers": workers, "synchronous": True}
        if batching is not None:
            options |= {
                "batch_size": batching.batch_size,
                "max_batch_delay": batching.max_batch_delay_ms,
            }
        request = management_pb2.RegisterModelRequest(url=url, **options)
        timeout = self.owner.register_timeout_s
        try:
            with self._call("register", model):
                self._management.RegisterModel(request, timeout=timeout)
        except RefitError as exc:
            if "already exists" not in exc.message:
                raise
            # After a TorchServe restart its model store (a cache) may still hold the archive:
            # register that copy by file name instead of downloading it again.
            file_name = url.rsplit("/", 1)[-1].split("?", 1)[0]
            retry = management_pb2.RegisterModelRequest(url=file_name, **options)
            with self._call("register", model):
                self._management.RegisterModel(retry, timeout=timeout)

    def set_default(self, model: str, version: str) -> None:
        request = management_pb2.SetDefaultRequest(model_name=model, model_version=version)
        with self._call("set_default", f"{model} v{version}"):
            self._management.SetDefault(request, timeout=self.owner.timeout_s)

    def unregister(self, model: str, version: str) -> None:
        request = management_pb2.UnregisterModelRequest(model_name=model, model_version=version)
        with self._call("unregister", f"{model} v{version}"):
            self._management.UnregisterModel(request, timeout=self.owner.timeout_s)

    def scale(self, model: str, version: str, workers: int, timeout_s: float) -> None:
        """Runs exactly ``workers`` workers for the version, waiting until they are up."""
        if workers == 0:
            self._scale_to_zero(model, version)
            return
        request = management_pb2.ScaleWorkerRequest(
            model_name=model,
            model_version=version,
            min_worker=workers,
            max_worker=workers,
            synchronous=True,
        )
        with self._call("scale_up", f"{model} v{version}"):
            self._management.ScaleWorker(request, timeout=timeout_s)

    def _scale_to_zero(self, model: str, version: str) -> None:
        """Through the REST management API: gRPC's ScaleWorker reads 0 workers as "unset"."""
        subject = f"{model} v{version} on {self.name}"
        if not self.replica.rest:
            raise FailedPrecondition(
                f"cannot scale {subject} to 0 workers: set REFIT_TORCHSERVE_MANAGEMENT_REST"
            )
        query = urllib.parse.urlencode({"min_worker": 0, "max_worker": 0, "synchronous": "true"})
        path = f"{urllib.parse.quote(model)}/{urllib.parse.quote(version)}"
        request = urllib.request.Request(
            f"http://{self.replica.rest}/models/{path}?{query}", method="PUT"
        )
        start, error = time.perf_counter(), None
        try:
            with urllib.request.urlopen(request, timeout=self.owner.timeout_s):
                pass
        except urllib.error.HTTPError as exc:
            error = "NOT_FOUND" if exc.code == 404 else "INTERNAL"
            detail = exc.read().decode(errors="replace")[:300]
            if exc.code == 404:
                raise NotFound(f"TorchServe has no {subject}: {detail}") from exc
            raise RefitError(f"TorchServe scale_down failed for {subject}: {detail}") from exc
        except OSError as exc:
            error = "UNAVAILABLE"
            raise Unavailable(f"TorchServe's REST API is unreachable ({exc}); retry") from exc
        finally:
            self.owner.observe("scale_down", time.perf_counter() - start, error)

    def _call(self, call: str, subject: str) -> AbstractContextManager[None]:
        return _call(self.owner.observe, call, f"{subject} on {self.name}")


@contextmanager
def _call(observe: CallObserver, call: str, subject: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    except grpc.RpcError as exc:
        observe(call, time.perf_counter() - start, exc.code().name)
        raise _translate(exc, call, subject) from exc
    observe(call, time.perf_counter() - start, None)


def _translate(exc: grpc.RpcError, call: str, subject: str) -> RefitError:
    code, details = exc.code(), exc.details() or ""
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceeded(f"TorchServe did not answer {call} for {subject} in time")
    if code == grpc.StatusCode.UNAVAILABLE:
        return Unavailable(f"TorchServe is unreachable ({details}); retry shortly")
    # TorchServe answers an unknown model with INTERNAL "Model not found: NAME" (0.12).
    unknown = code == grpc.StatusCode.INTERNAL and "model not found" in details.lower()
    if call == "predict" and "has no worker" in details:
        return NoWorker(f"{subject} has no worker running in TorchServe (scaled to 0)")
    if code == grpc.StatusCode.NOT_FOUND or unknown:
        if call == "predict":
            return ModelNotLoaded(f"{subject} is published but not loaded in TorchServe yet; retry")
        return NotFound(f"TorchServe has no {subject}: {details}")
    return RefitError(f"TorchServe {call} failed for {subject}: {code.name} {details}")
