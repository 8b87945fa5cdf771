"""Faults under load on the compose stack: the container test's chaos run and its long form
(bench/chaos.py) share this.

``Load`` runs clients that send Predicts at a steady pace, each client alternating over the
service replicas and the models; every call is recorded (``Call``). ``Faults`` injects one fault
at a time into the running stack (a TorchServe replica, a service replica or the trainer killed
as a crash kills them, the object store frozen) and records its window: from the fault until
every container is healthy again and every service replica answers a Predict for every model.
``Verdict`` then sorts the calls: wrong answers, failures outside every window, failures with a
status other than UNAVAILABLE or DEADLINE_EXCEEDED.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from deploy.containers.stack import ComposeStack, docker
from refit.v1 import refit_pb2, refit_pb2_grpc

ALLOWED_FAILURES = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED"})
# Long-running services and their containers' health: all must be healthy again after a fault.
LONG_RUNNING = ("minio", "torchserve", "trainer-cpu", "service", "prometheus")


@dataclass(frozen=True)
class Request:
    """What the clients send for one model, and how an answer is judged."""

    model: str
    image: bytes
    # Whether an answer (version, labels best first) is right; None: judged after the run.
    right: Callable[[str, tuple[str, ...]], bool] | None = None


@dataclass(frozen=True)
class Call:
    started: float  # time.monotonic()
    ended: float
    address: str
    model: str
    code: str  # "OK" or the gRPC status name
    version: str = ""
    labels: tuple[str, ...] = ()
    message: str = ""


class Load:
    """``clients`` threads; each sends a Predict every ``interval_s`` (or as soon as the last one
    ends, if that took longer), alternating over ``addresses`` and ``requests``."""

    def __init__(
        self,
        addresses: list[str],
        token: str,
        requests: list[Request],
        *,
        clients: int = 8,
        interval_s: float = 0.5,
        timeout_s: float = 10.0,
    ) -> None:
        self.addresses, self.token, self.requests = addresses, token, requests
        self.clients, self.interval_s, self.timeout_s = clients, interval_s, timeout_s
        self.calls: list[Call] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        for n in range(self.clients):
            thread = threading.Thread(target=self._client, args=(n,), daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> list[Call]:
        self._stop.set()
        for thread in self._threads:
            thread.join(self.timeout_s + 5)
        with self._lock:
            return list(self.calls)

    def _client(self, n: int) -> None:
        channels = [grpc.insecure_channel(a) for a in self.addresses]
        stubs = [refit_pb2_grpc.RefitStub(c) for c in channels]
        metadata = [("authorization", f"Bearer {self.token}")]
        turn = n  # clients start on different replicas and models
        try:
            while not self._stop.is_set():
                began = time.monotonic()
                replica = turn % len(stubs)
                request = self.requests[(turn // len(stubs)) % len(self.requests)]
                call = self._predict(stubs[replica], self.addresses[replica], request, metadata)
                with self._lock:
                    self.calls.append(call)
                turn += 1
                self._stop.wait(max(self.interval_s - (time.monotonic() - began), 0.0))
        finally:
            for channel in channels:
                channel.close()

    def _predict(self, stub, address: str, request: Request, metadata) -> Call:
        started = time.monotonic()
        try:
            answer = stub.Predict(
                refit_pb2.PredictRequest(image=request.image, model=request.model, top_k=5),
                metadata=metadata,
                timeout=self.timeout_s,
            )
        except grpc.RpcError as error:
            return Call(started, time.monotonic(), address, request.model, error.code().name,
                        message=(error.details() or "")[:200])  # fmt: skip
        labels = tuple(p.label for p in answer.predictions)
        return Call(started, time.monotonic(), address, request.model, "OK", answer.version, labels)


@dataclass
class Fault:
    name: str
    started: float
    ready: float | None = None  # every container healthy and every replica answering again

    @property
    def recovery_s(self) -> float | None:
        return None if self.ready is None else self.ready - self.started


class Faults:
    """Injects faults into ``stack`` one at a time and waits for the stack to be whole again."""

    def __init__(self, stack: ComposeStack, probes: list[Request], ready_bound_s: float) -> None:
        self.stack, self.probes, self.ready_bound_s = stack, probes, ready_bound_s
        self.done: list[Fault] = []

    def crash(self, service: str, index: int = 1) -> Fault:
        """The container's main process SIGKILLed, as the kernel's OOM killer would: Docker
        restarts it by its policy (``docker kill`` is an operator's stop, never restarted)."""
        container = self.stack.container(service, index)
        fault = Fault(f"{service} #{index} killed", time.monotonic())
        os.kill(self.stack.inspect(container)["State"]["Pid"], signal.SIGKILL)
        return self._recovered(fault)

    def freeze_store(self, seconds: float) -> Fault:
        """The object store frozen (``docker pause``): connections hang, as to a stalled server.
        The stand-in keeps objects in memory only, so a stop would lose them."""
        container = self.stack.container("minio")
        fault = Fault(f"object store frozen for {seconds:.0f} s", time.monotonic())
        docker("pause", container)
        try:
            time.sleep(seconds)
        finally:
            docker("unpause", container)
        return self._recovered(fault)

    def _recovered(self, fault: Fault) -> Fault:
        time.sleep(2)  # let health checks notice before asking whether all is well again
        deadline = fault.started + self.ready_bound_s
        while not self.whole():
            if time.monotonic() > deadline:
                self.done.append(fault)
                raise TimeoutError(f"{fault.name}: not ready again within {self.ready_bound_s} s")
            time.sleep(1)
        fault.ready = time.monotonic()
        self.done.append(fault)
        return fault

    def whole(self) -> bool:
        """Every long-running container running and healthy, every service replica SERVING and
        answering a Predict for every probe model."""
        for service in LONG_RUNNING:
            for container in self.stack.containers(service):
                state = self.stack.inspect(container)["State"]
                health = state.get("Health", {}).get("Status", "healthy")
                if not state["Running"] or health != "healthy":
                    return False
        return all(self._answers(address) for address in self.stack.addresses)

    def _answers(self, address: str) -> bool:
        metadata = [("authorization", f"Bearer {self.stack.admin_token}")]
        try:
            with grpc.insecure_channel(address) as channel:
                health = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=5
                )
                if health.status != health_pb2.HealthCheckResponse.SERVING:
                    return False
                stub = refit_pb2_grpc.RefitStub(channel)
                for probe in self.probes:
                    stub.Predict(
                        refit_pb2.PredictRequest(image=probe.image, model=probe.model),
                        metadata=metadata,
                        timeout=10,
                    )
        except grpc.RpcError:
            return False
        return True


@dataclass
class Verdict:
    calls: list[Call]
    faults: list[Fault]
    grace_s: float  # after a fault's window: calls that began by then may still fail
    wrong: list[Call] = field(default_factory=list)
    outside: list[Call] = field(default_factory=list)  # failed outside every fault's window
    bad_status: list[Call] = field(default_factory=list)  # failed with another status

    @classmethod
    def judge(
        cls,
        calls: list[Call],
        faults: list[Fault],
        right: Callable[[Call], bool],
        grace_s: float,
    ) -> Verdict:
        verdict = cls(calls, faults, grace_s)
        for call in calls:
            if call.code == "OK":
                if not right(call):
                    verdict.wrong.append(call)
            elif call.code not in ALLOWED_FAILURES:
                verdict.bad_status.append(call)
            elif verdict.window_of(call) is None:
                verdict.outside.append(call)
        return verdict

    def window_of(self, call: Call) -> Fault | None:
        for fault in self.faults:
            end = (fault.ready or float("inf")) + self.grace_s
            if fault.started <= call.ended and call.started <= end:
                return fault
        return None

    def failed_per_fault(self) -> dict[str, Counter]:
        """Per fault, its failed calls by status."""
        counts: dict[str, Counter] = {fault.name: Counter() for fault in self.faults}
        for call in self.calls:
            fault = self.window_of(call) if call.code != "OK" else None
            if fault is not None:
                counts[fault.name][call.code] += 1
        return counts

    def calls_per_fault(self) -> dict[str, int]:
        """Per fault, how many calls overlapped its window."""
        return {
            fault.name: sum(1 for call in self.calls if self.window_of(call) is fault)
            for fault in self.faults
        }
