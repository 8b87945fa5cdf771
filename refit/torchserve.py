"""The one module that talks to TorchServe, through its own gRPC APIs.

Channels are created once and reused; every call has a deadline; TorchServe's failures become
the service's domain errors here and nowhere else.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import grpc
from google.protobuf import empty_pb2

from refit.errors import DeadlineExceeded, NotFound, RefitError, Unavailable
from refit.registry import Batching
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


class ModelNotLoaded(RefitError):
    """TorchServe does not (yet) serve a version the registry has: a reconcile is due."""

    code = grpc.StatusCode.UNAVAILABLE


@dataclass(frozen=True)
class ServedVersion:
    model: str
    version: str
    is_default: bool
    workers: int


class TorchServeClient:
    def __init__(
        self,
        inference_target: str,
        management_target: str,
        *,
        timeout_s: float = 10.0,
        register_timeout_s: float = 180.0,
        observe: CallObserver | None = None,
    ) -> None:
        self.observe = observe or (lambda call, seconds, error: None)
        self.timeout_s = timeout_s
        self.register_timeout_s = register_timeout_s
        self._inference_channel = grpc.insecure_channel(inference_target, _CHANNEL_OPTIONS)
        self._management_channel = grpc.insecure_channel(management_target, _CHANNEL_OPTIONS)
        self._inference = inference_pb2_grpc.InferenceAPIsServiceStub(self._inference_channel)
        self._management = management_pb2_grpc.ManagementAPIsServiceStub(self._management_channel)

    def close(self) -> None:
        self._inference_channel.close()
        self._management_channel.close()

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
        with self._call("predict", f"{model} v{version}"):
            response = self._inference.Predictions(request, timeout=timeout)
        return json.loads(response.prediction)

    def ping(self) -> bool:
        try:
            with self._call("ping", "TorchServe"):
                answer = self._inference.Ping(empty_pb2.Empty(), timeout=2)
        except RefitError:
            return False
        return "Healthy" in answer.health

    def served_versions(self) -> list[ServedVersion]:
        with self._call("list_models", "TorchServe"):
            listing = self._management.ListModels(
                management_pb2.ListModelsRequest(limit=1000), timeout=self.timeout_s
            )
        names = [m["modelName"] for m in json.loads(listing.msg).get("models", [])]
        return [version for name in names for version in self._describe(name)]

    def _describe(self, model: str) -> Iterator[ServedVersion]:
        request = management_pb2.DescribeModelRequest(model_name=model, model_version="all")
        with self._call("describe_model", model):
            answer = self._management.DescribeModel(request, timeout=self.timeout_s)
        for entry in json.loads(answer.msg):
            yield ServedVersion(
                model=entry["modelName"],
                version=entry["modelVersion"],
                is_default=bool(entry.get("isDefaultVersion", False)),
                workers=len(entry.get("workers", [])),
            )

    def register(
        self,
        model: str,
        url: str,
        *,
        workers: int = 1,
        batching: Batching | None = None,
    ) -> None:
        """Registers an archive from ``url`` and waits until its workers are up; ``batching``:
        the version's recorded settings (None: TorchServe's default, one request at a time)."""
        options = {"model_name": model, "initial_workers": workers, "synchronous": True}
        if batching is not None:
            options |= {
                "batch_size": batching.batch_size,
                "max_batch_delay": batching.max_batch_delay_ms,
            }
        request = management_pb2.RegisterModelRequest(url=url, **options)
        try:
            with self._call("register", model):
                self._management.RegisterModel(request, timeout=self.register_timeout_s)
        except RefitError as exc:
            if "already exists" not in exc.message:
                raise
            # After a TorchServe restart its model store (a cache) may still hold the archive:
            # register that copy by file name instead of downloading it again.
            file_name = url.rsplit("/", 1)[-1].split("?", 1)[0]
            retry = management_pb2.RegisterModelRequest(url=file_name, **options)
            with self._call("register", model):
                self._management.RegisterModel(retry, timeout=self.register_timeout_s)

    def set_default(self, model: str, version: str) -> None:
        request = management_pb2.SetDefaultRequest(model_name=model, model_version=version)
        with self._call("set_default", f"{model} v{version}"):
            self._management.SetDefault(request, timeout=self.timeout_s)

    def unregister(self, model: str, version: str) -> None:
        request = management_pb2.UnregisterModelRequest(model_name=model, model_version=version)
        with self._call("unregister", f"{model} v{version}"):
            self._management.UnregisterModel(request, timeout=self.timeout_s)

    @contextmanager
    def _call(self, call: str, subject: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        except grpc.RpcError as exc:
            self.observe(call, time.perf_counter() - start, exc.code().name)
            raise _translate(exc, call, subject) from exc
        self.observe(call, time.perf_counter() - start, None)


def _translate(exc: grpc.RpcError, call: str, subject: str) -> RefitError:
    code, details = exc.code(), exc.details() or ""
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceeded(f"TorchServe did not answer {call} for {subject} in time")
    if code == grpc.StatusCode.UNAVAILABLE:
        return Unavailable(f"TorchServe is unreachable ({details}); retry shortly")
    # TorchServe answers an unknown model with INTERNAL "Model not found: NAME" (0.12).
    unknown = code == grpc.StatusCode.INTERNAL and "model not found" in details.lower()
    if code == grpc.StatusCode.NOT_FOUND or unknown:
        if call == "predict":
            return ModelNotLoaded(f"{subject} is published but not loaded in TorchServe yet; retry")
        return NotFound(f"TorchServe has no {subject}: {details}")
    return RefitError(f"TorchServe {call} failed for {subject}: {code.name} {details}")
