"""Faults under load on the compose stack: the container test's chaos run and its long form
(bench/chaos.py) share this.

``Chaos.run`` starts a retrain, then, while it trains and ``Load``'s clients send Predicts (each
client alternating over the service replicas and the models, every call recorded as a ``Call``),
injects one fault at a time (``Faults``): the trainer killed mid-epoch, a TorchServe replica and
a service replica killed as a crash kills them, the object store frozen. Each fault's window runs
from the fault until every container is healthy again and every service replica answers a
Predict for every model. ``Verdict`` then sorts the calls: wrong answers, failures outside every
window, failures with a status other than UNAVAILABLE or DEADLINE_EXCEEDED.
"""

from __future__ import annotations

import io
import os
import random
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from deploy.containers.stack import ComposeStack, docker
from refit.v1 import refit_pb2, refit_pb2_grpc

TERMINAL = (refit_pb2.SUCCEEDED, refit_pb2.FAILED, refit_pb2.CANCELLED)

ALLOWED_FAILURES = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED"})
# Long-running services and their containers' health: all must be healthy again after a fault.
LONG_RUNNING = ("minio", "torchserve", "trainer-cpu", "service", "prometheus")


@dataclass(frozen=True)
class Request:
    """What the clients send for one model, and how an answer is judged."""

    model: str
    image: bytes
    # Whether an answer (version, labels best first) is right. None: it must be what that
    # version answers the image asked alone after the run (inference is deterministic).
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
        interval_s: float = 1.0,
        # A client's deadline: a call is lost when unanswered by then. On 2 cores, training and
        # publishing beside the load queue an answer past 10 s now and then, fault or not.
        timeout_s: float = 30.0,
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
        """The fault whose window the call overlaps; of two (a fault came within the grace
        after the last one was over), the later one."""
        overlapping = [
            fault
            for fault in self.faults
            if fault.started <= call.ended
            and call.started <= (fault.ready or float("inf")) + self.grace_s
        ]
        return max(overlapping, key=lambda fault: fault.started, default=None)

    def failed_per_fault(self) -> dict[str, Counter]:
        """Per fault, its failed calls by status."""
        counts: dict[str, Counter] = {fault.name: Counter() for fault in self.faults}
        for call in self.calls:
            fault = self.window_of(call) if call.code != "OK" else None
            if fault is not None:
                counts[fault.name][call.code] += 1
        return counts

    def reasons_per_fault(self, top: int = 3) -> dict[str, list[tuple[str, int]]]:
        """Per fault, its failed calls' most common messages (their first 90 characters)."""
        reasons: dict[str, Counter] = {fault.name: Counter() for fault in self.faults}
        for call in self.calls:
            fault = self.window_of(call) if call.code != "OK" else None
            if fault is not None:
                reasons[fault.name][call.message[:90]] += 1
        return {name: counter.most_common(top) for name, counter in reasons.items()}

    def latency(self) -> dict[str, float]:
        """Answered calls' p50, p99 and slowest, in seconds."""
        seconds = sorted(c.ended - c.started for c in self.calls if c.code == "OK")
        if not seconds:
            return {}
        return {
            "p50": seconds[len(seconds) // 2],
            "p99": seconds[min(int(len(seconds) * 0.99), len(seconds) - 1)],
            "max": seconds[-1],
        }

    def calls_per_fault(self) -> dict[str, int]:
        """Per fault, how many calls overlapped its window."""
        return {
            fault.name: sum(1 for call in self.calls if self.window_of(call) is fault)
            for fault in self.faults
        }


@dataclass
class Outcome:
    calls: list[Call]
    faults: list[Fault]
    job: refit_pb2.Job  # as it ended
    trained_before_faults: refit_pb2.Job  # as it was when the first fault came


@dataclass
class Chaos:
    """One retrain under load, with each fault in turn while it trains."""

    stack: ComposeStack
    requests: list[Request]
    clients: int = 8
    ready_bound_s: float = 240.0
    store_frozen_s: float = 30.0
    job_timeout_s: float = 1800.0

    def run(self, retrain: refit_pb2.RetrainRequest) -> Outcome:
        load = Load(self.stack.addresses, self.stack.predict_token, self.requests,
                    clients=self.clients)  # fmt: skip
        faults = Faults(self.stack, self.requests, self.ready_bound_s)
        load.start()
        try:
            job = self.admin("Retrain", retrain)
            training = self.wait_job(job.id, mid_epoch_with_a_checkpoint, 600)
            faults.crash("trainer-cpu")
            faults.crash("torchserve", 1)
            faults.crash("service", 1)
            faults.freeze_store(self.store_frozen_s)
            ended = self.wait_job(job.id, lambda j: j.state in TERMINAL, self.job_timeout_s)
        finally:
            calls = load.stop()
        return Outcome(calls, faults.done, ended, training)

    def judge(self, outcome: Outcome, grace_s: float) -> Verdict:
        """The run's calls sorted (``Verdict``), each answer judged by its ``Request``."""
        requests = {request.model: request for request in self.requests}
        answered = {(c.model, c.version) for c in outcome.calls if c.code == "OK"}
        alone = {
            (model, version): self.answer_alone(requests[model], version)
            for model, version in answered
            if requests[model].right is None
        }

        def right(call: Call) -> bool:
            judge = requests[call.model].right
            if judge is not None:
                return judge(call.version, call.labels)
            return alone[(call.model, call.version)] == call.labels

        return Verdict.judge(outcome.calls, outcome.faults, right, grace_s)

    def answer_alone(self, request: Request, version: str) -> tuple[str, ...]:
        predict = refit_pb2.PredictRequest(
            image=request.image, model=request.model, version=version, top_k=5
        )
        return tuple(p.label for p in self.admin("Predict", predict, timeout=60).predictions)

    def admin(self, method: str, request, timeout: float = 30):
        """An admin call through the first service replica."""
        with grpc.insecure_channel(self.stack.address) as channel:
            return getattr(refit_pb2_grpc.RefitStub(channel), method)(
                request,
                metadata=[("authorization", f"Bearer {self.stack.admin_token}")],
                timeout=timeout,
            )

    def wait_job(self, job_id: str, done: Callable[[refit_pb2.Job], bool], timeout: float):
        deadline = time.monotonic() + timeout
        while True:
            try:
                job = self.admin("GetJob", refit_pb2.GetJobRequest(id=job_id))
                if done(job):
                    return job
            except grpc.RpcError:
                pass  # a fault in progress: its replica, or the trainer, is away
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id}: not there within {timeout:.0f} s")
            time.sleep(1)


def mid_epoch_with_a_checkpoint(job: refit_pb2.Job) -> bool:
    """Training, past its first epoch (so a restart resumes from a checkpoint), mid-epoch."""
    return (
        job.state == refit_pb2.TRAINING and job.progress.epoch >= 2 and not job.progress.epoch_end
    )


def colour_image(colour: tuple[int, int, int], size: int = 48) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, "PNG")
    return buffer.getvalue()


def colour_dataset(root: Path, classes: dict[str, tuple[int, int, int]], per_class: int) -> Path:
    """``per_class`` small PNGs per class in the ImageFolder layout: the class colour with noise,
    which a few epochs learn."""
    rng = random.Random(7)
    for name, colour in classes.items():
        (root / name).mkdir(parents=True)
        for n in range(per_class):
            pixels = bytes(
                max(0, min(255, c + rng.randint(-40, 40))) for _ in range(48 * 48) for c in colour
            )
            Image.frombytes("RGB", (48, 48), pixels).save(root / name / f"{n}.png")
    return root
