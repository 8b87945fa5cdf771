"""One TorchServe replica: its inference, management, REST management and metrics APIs.

Every call carries this replica's key for its API (refit/torchserve/keys.py); a key the replica
refuses is read again and the call retried once. A replica whose keys cannot be read, or which
refuses the ones just read, counts as unreachable (``Unavailable``): callers that fan out skip
it and the reconciler brings it in line once it answers.
"""

from __future__ import annotations

import contextlib
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf import empty_pb2

from refit.errors import FailedPrecondition, NotFound, RefitError, Unavailable
from refit.identifiers import VERSION
from refit.registry import Batching
from refit.torchserve.calls import CHANNEL_OPTIONS, KeyRefused, observed
from refit.torchserve.counters import epoch, inference_counts
from refit.torchserve.keys import Keys
from refit.torchserve.targets import Replica
from refit.torchserve_api import (
    inference_pb2,
    inference_pb2_grpc,
    management_pb2,
    management_pb2_grpc,
)

if TYPE_CHECKING:
    from refit.torchserve.client import TorchServeClient

# Reading the metrics API takes at most this long, so a dead replica cannot hold the service's
# housekeeping for the whole upstream timeout.
METRICS_TIMEOUT_S = 5.0
# After a refused key, the keeper may publish the new one a moment later: read again after this.
KEY_REREAD_S = 0.25


class NoKeysConfigured(FailedPrecondition):
    """TorchServe's token authorization is on and refit was given no keys: a configuration
    error, not an outage (nothing to wait for)."""


@dataclass(frozen=True)
class ServedVersion:
    model: str
    version: str
    workers: int  # TorchServe 0.12's describe does not say which version is the default
    job_queue_size: int = 0  # its job queue's capacity (TorchServe's job_queue_size)
    started_at: float = 0.0  # its newest worker's start, epoch seconds by TorchServe's clock
    starting: bool = False  # a worker is not READY: starting (or stopping)


class ReplicaClient:
    """One replica; ``owner`` holds the timeouts, the keys and the call observer."""

    def __init__(self, replica: Replica, owner: TorchServeClient) -> None:
        self.replica = replica
        self.name = replica.name
        self.owner = owner
        self.channel = grpc.insecure_channel(replica.management, CHANNEL_OPTIONS)
        self._management = management_pb2_grpc.ManagementAPIsServiceStub(self.channel)
        self.inference_channel = grpc.insecure_channel(replica.inference, CHANNEL_OPTIONS)
        self._inference = inference_pb2_grpc.InferenceAPIsServiceStub(self.inference_channel)
        self.closed = False

    def close(self) -> None:
        self.closed = True
        self.channel.close()
        self.inference_channel.close()

    # --- inference -------------------------------------------------------------------------------

    def predict(
        self, request: inference_pb2.PredictionsRequest, timeout_s: float
    ) -> inference_pb2.PredictionResponse:
        subject = f"{request.model_name} v{request.model_version}"
        return self._invoke("inference", "predict", subject, self._inference.Predictions,
                            request, timeout_s)  # fmt: skip

    def ping(self) -> bool:
        try:
            answer = self._invoke(
                "inference", "ping", "TorchServe", self._inference.Ping, empty_pb2.Empty(), 2.0
            )
        except RefitError:
            return False
        return "Healthy" in answer.health

    # --- what it holds ---------------------------------------------------------------------------

    def model_names(self) -> set[str]:
        listing = self._manage(
            "list_models", "TorchServe", self._management.ListModels,
            management_pb2.ListModelsRequest(limit=1000),
        )  # fmt: skip
        return {m["modelName"] for m in json.loads(listing.msg).get("models", [])}

    def served_versions(self) -> list[ServedVersion]:
        return [version for name in self.model_names() for version in self._describe(name)]

    def holds(self, model: str, version: str) -> bool:
        try:
            return any(v.version == version for v in self._describe(model))
        except NotFound:
            return False

    def describe(self, model: str, version: str) -> ServedVersion | None:
        """The version here (its workers, its queue); None when this replica does not hold it."""
        try:
            return next(iter(self._describe(model, version)), None)
        except NotFound:
            return None

    def _describe(self, model: str, version: str = "all") -> Iterator[ServedVersion]:
        request = management_pb2.DescribeModelRequest(model_name=model, model_version=version)
        answer = self._manage("describe_model", model, self._management.DescribeModel, request)
        for entry in json.loads(answer.msg):
            queue = entry.get("jobQueueStatus", {})
            workers = entry.get("workers", [])
            yield ServedVersion(
                model=entry["modelName"],
                version=entry["modelVersion"],
                workers=len(workers),
                job_queue_size=queue.get("remainingCapacity", 0) + queue.get("pendingRequests", 0),
                started_at=max((epoch(w.get("startTime", "")) for w in workers), default=0.0),
                # TorchServe 0.12 says READY or, for any other state, UNLOADING
                starting=any(w.get("status") != "READY" for w in workers),
            )

    def inference_counts(self) -> dict[tuple[str, str], float]:
        """TorchServe's ``ts_inference_requests_total`` on this replica, per (model, version):
        every inference request it received since it started (gRPC and REST, answered or
        refused), whichever service replica sent it; one naming no version counts under
        "default". Its metrics API needs no key."""
        if not self.replica.metrics:
            raise FailedPrecondition(
                f"no metrics address for {self.name}: set REFIT_TORCHSERVE_METRICS"
            )
        start, error = time.perf_counter(), None
        timeout = min(self.owner.timeout_s, METRICS_TIMEOUT_S)
        try:
            url = f"http://{self.replica.metrics}/metrics"
            with urllib.request.urlopen(url, timeout=timeout) as answer:
                text = answer.read().decode(errors="replace")
        except OSError as exc:
            error = "UNAVAILABLE"
            raise Unavailable(
                f"TorchServe's metrics API on {self.name} is unreachable ({exc}); retry shortly"
            ) from exc
        finally:
            self.owner.observe("inference_counts", time.perf_counter() - start, error)
        return inference_counts(text, self.name)

    # --- registration and workers ----------------------------------------------------------------

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
        options: dict[str, Any] = {
            "model_name": model, "initial_workers": workers, "synchronous": True,
        }  # fmt: skip
        if batching is not None:
            options |= {
                "batch_size": batching.batch_size,
                "max_batch_delay": batching.max_batch_delay_ms,
            }
        timeout = self.owner.register_timeout_s
        register = self._management.RegisterModel
        try:
            request = management_pb2.RegisterModelRequest(url=url, **options)
            self._manage("register", model, register, request, timeout)
        except RefitError as exc:
            if "already exists" not in exc.message:
                raise
            # After a TorchServe restart its model store (a cache) may still hold the archive:
            # register that copy by file name instead of downloading it again.
            file_name = url.rsplit("/", 1)[-1].split("?", 1)[0]
            retry = management_pb2.RegisterModelRequest(url=file_name, **options)
            self._manage("register", model, register, retry, timeout)

    def set_default(self, model: str, version: str) -> None:
        request = management_pb2.SetDefaultRequest(model_name=model, model_version=version)
        self._manage("set_default", f"{model} v{version}", self._management.SetDefault, request)

    def unregister(self, model: str, version: str) -> None:
        request = management_pb2.UnregisterModelRequest(model_name=model, model_version=version)
        self._manage("unregister", f"{model} v{version}", self._management.UnregisterModel, request)

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
        self._manage(
            "scale_up", f"{model} v{version}", self._management.ScaleWorker, request, timeout_s
        )

    def _scale_to_zero(self, model: str, version: str) -> None:
        """Through the REST management API: gRPC's ScaleWorker reads 0 workers as "unset"."""
        subject = f"{model} v{version} on {self.name}"
        if not self.replica.rest:
            raise FailedPrecondition(
                f"cannot scale {subject} to 0 workers: set REFIT_TORCHSERVE_MANAGEMENT_REST"
            )
        for attempt in range(2):
            keys = self.owner.keys.get(self.replica)
            try:
                self._rest_put(f"models/{_rest_path(model, version)}", subject, keys)
                return
            except KeyRefused as exc:
                if not self._retry_with_new_keys(keys, exc, attempt):
                    raise

    def _rest_put(self, path: str, subject: str, keys: Keys) -> None:
        query = urllib.parse.urlencode({"min_worker": 0, "max_worker": 0, "synchronous": "true"})
        request = urllib.request.Request(
            f"http://{self.replica.rest}/{path}?{query}",
            method="PUT",
            headers=dict(keys.metadata("management")),
        )
        start, error = time.perf_counter(), None
        try:
            with urllib.request.urlopen(request, timeout=self.owner.timeout_s):
                pass
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")[:300]
            error = "NOT_FOUND" if exc.code == 404 else "INTERNAL"
            if exc.code == 404:
                raise NotFound(f"TorchServe has no {subject}: {detail}") from exc
            if "Token Authorization failed" in detail:  # REST answers it with 400
                error = "PERMISSION_DENIED"
                raise KeyRefused(f"TorchServe refused refit's key for {subject}") from exc
            raise RefitError(f"TorchServe scale_down failed for {subject}: {detail}") from exc
        except OSError as exc:
            error = "UNAVAILABLE"
            raise Unavailable(f"TorchServe's REST API is unreachable ({exc}); retry") from exc
        finally:
            self.owner.observe("scale_down", time.perf_counter() - start, error)

    # --- calls -----------------------------------------------------------------------------------

    def _manage(
        self, call: str, subject: str, rpc: Callable, request: Any, timeout_s: float | None = None
    ) -> Any:
        timeout = self.owner.timeout_s if timeout_s is None else timeout_s
        return self._invoke("management", call, subject, rpc, request, timeout)

    def _invoke(
        self, kind: str, call: str, subject: str, rpc: Callable, request: Any, timeout_s: float
    ) -> Any:
        """``rpc`` with this replica's ``kind`` key; once more after a refused key changed."""
        for attempt in range(2):
            keys = self.owner.keys.get(self.replica)
            try:
                with observed(self.owner.observe, call, f"{subject} on {self.name}"):
                    return rpc(request, timeout=timeout_s, metadata=keys.metadata(kind))
            except KeyRefused as exc:
                if not self._retry_with_new_keys(keys, exc, attempt):
                    raise
            except (RefitError, ValueError) as exc:
                # The replica left the targets' answer and its channels were closed: grpc
                # cancels calls in flight, and one started just after raises ValueError.
                if self.closed:
                    raise Unavailable(f"TorchServe at {self.name} left during {call} for "
                                      f"{subject}; retry") from exc  # fmt: skip
                raise
        raise AssertionError("unreachable")

    def _retry_with_new_keys(self, held: Keys, refused: KeyRefused, attempt: int) -> bool:
        """After the replica refused ``held``: whether a retry is worth it (the keys changed)."""
        if held == Keys():
            raise NoKeysConfigured(
                f"TorchServe at {self.name} wants a key (its token authorization is on) "
                "and refit has none: set REFIT_TORCHSERVE_KEYS"
            ) from refused
        return attempt == 0 and self._keys_changed()

    def _keys_changed(self) -> bool:
        """Reads this replica's keys again (twice, a moment apart: its keeper publishes new keys
        just after TorchServe starts using them); whether they changed."""
        if self.owner.keys.refresh(self.replica):
            return True
        time.sleep(KEY_REREAD_S)
        return self.owner.keys.refresh(self.replica)


def _rest_path(model: str, version: str) -> str:
    """``model/version`` for a REST URL. TorchServe 0.12 takes any management request whose text
    contains "/token" for a call to its token API, so a model named token... gets its first
    letter escaped (TorchServe decodes the path before it routes)."""
    quoted = urllib.parse.quote(model)
    if quoted.startswith("t"):
        quoted = "%74" + quoted[1:]
    return f"{quoted}/{urllib.parse.quote(version)}"
