"""Load and soak against a running stack (the service as its own process, a real TorchServe, the
embedded store), all through the public API with tokens on:

1. load: CLIENTS clients x PER_CLIENT Predicts at once;
2. soak: SOAK more Predicts from 8 clients, the service's RSS sampled from /proc every 1,000;
   growth is measured from the soak's start (after the load phase warmed every cache);
3. stream: one PredictStream of STREAM images; every answer present, in order and right.

Every answer is checked against the answer the same image got alone before the run (labels,
scores, version): lost = an RPC that failed, wrong = any difference (a mixed-up or corrupted
answer). ``--model imagenet`` serves the base model (EfficientNet-Lite0, 224 px);
``--model tiny`` (default) first retrains a small model at 32 px through the trainer, so the
run measures the service rather than CPU inference on a shared machine.

Usage: .venv/bin/python bench/load_soak.py [--model tiny|imagenet --clients 16
       --per-client 1000 --soak 20000 --stream 10000]; prints JSON summaries.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import threading
import time
from dataclasses import dataclass, field

from PIL import Image
from running_stack import RunningStack, running_stack
from skimage import data

from cli.client import ClientSettings, connect
from local_stack.demo import dataset, upload
from refit.storage import StorageSettings
from refit.v1 import refit_pb2 as pb
from refit.v1 import refit_pb2_grpc


def jpeg(array) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


@dataclass(frozen=True)
class Workload:
    model: str
    images: list[bytes]
    reference: list[tuple] = field(default_factory=list)  # each image's answer, alone

    def image(self, n: int) -> tuple[int, bytes]:
        index = n % len(self.images)
        return index, self.images[index]


def answer_key(answer: pb.PredictResponse) -> tuple:
    return answer.version, tuple((p.label, round(p.score, 5)) for p in answer.predictions)


def prepare(stack: RunningStack, model: str) -> Workload:
    stub = refit_pb2_grpc.RefitStub(connect(ClientSettings(stack.address, token=stack.admin_token)))
    if model == "imagenet":
        images = [jpeg(data.coffee()), jpeg(data.chelsea()), jpeg(data.astronaut())]
    else:
        _, train, test = dataset(20, 2)
        uri = upload(StorageSettings(data_dir=stack.data_dir).open(), "datasets", "tiny", train)
        hp = pb.Hyperparameters(epochs=1, batch_size=32, crop_size=32)
        job = stub.Retrain(pb.RetrainRequest(model=model, dataset_uri=uri, hyperparameters=hp,
                                             force=True), timeout=60)  # fmt: skip
        for event in stub.WatchJob(pb.WatchJobRequest(id=job.id), timeout=1800):
            job = event.job
        if job.state != pb.SUCCEEDED:
            raise RuntimeError(f"the tiny model did not train: {job.error}")
        images = [example.png for example in test]
    workload = Workload(model, images)
    for image in images:
        answer = stub.Predict(pb.PredictRequest(image=image, model=model), timeout=60)
        workload.reference.append(answer_key(answer))
    return workload


@dataclass
class Tally:
    ok: int = 0
    lost: int = 0
    wrong: int = 0
    latencies: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, ok: int, lost: int, wrong: int, latencies: list[float], errors: dict) -> None:
        with self.lock:
            self.ok, self.lost, self.wrong = self.ok + ok, self.lost + lost, self.wrong + wrong
            self.latencies += latencies
            for code, n in errors.items():
                self.errors[code] = self.errors.get(code, 0) + n

    def summary(self, seconds: float) -> dict:
        ordered = sorted(self.latencies)
        return {
            "requests": self.ok + self.lost + self.wrong,
            "ok": self.ok,
            "lost": self.lost,
            "wrong": self.wrong,
            "errors": self.errors,
            "seconds": round(seconds, 1),
            "rps": round(len(ordered) / seconds, 1),
            "p50_ms": round(1000 * statistics.median(ordered), 1),
            "p99_ms": round(1000 * ordered[int(0.99 * (len(ordered) - 1))], 1),
        }


def clients(
    stack: RunningStack, work: Workload, count: int, per_client: int, on_progress=None
) -> dict:
    """``count`` threads, each with its own channel, ``per_client`` Predicts each."""
    tally = Tally()
    done = [0]
    progress_lock = threading.Lock()

    def client(n: int) -> None:
        channel = connect(ClientSettings(stack.address, token=stack.predict_token))
        stub = refit_pb2_grpc.RefitStub(channel)
        ok = lost = wrong = 0
        latencies, errors = [], {}
        for i in range(per_client):
            index, image = work.image(n + i)
            start = time.perf_counter()
            try:
                answer = stub.Predict(pb.PredictRequest(image=image, model=work.model), timeout=60)
            except Exception as exc:  # every failure is a lost request
                lost += 1
                code = getattr(exc, "code", lambda: None)()
                name = code.name if code else type(exc).__name__
                errors[name] = errors.get(name, 0) + 1
                continue
            latencies.append(time.perf_counter() - start)
            if answer_key(answer) == work.reference[index]:
                ok += 1
            else:
                wrong += 1
            if on_progress is not None:
                with progress_lock:
                    done[0] += 1
                    on_progress(done[0])
        channel.close()
        tally.add(ok, lost, wrong, latencies, errors)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(count)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return tally.summary(time.perf_counter() - start)


def soak(stack: RunningStack, work: Workload, total: int, concurrency: int = 8) -> dict:
    samples = [(0, stack.rss_bytes())]

    def sample(done: int) -> None:
        if done % 1000 == 0:
            samples.append((done, stack.rss_bytes()))

    result = clients(stack, work, concurrency, total // concurrency, on_progress=sample)
    samples.append((result["requests"], stack.rss_bytes()))
    start, end = samples[0][1], samples[-1][1]
    peak = max(r for _, r in samples)
    result["rss_mib"] = {"start": _mib(start), "end": _mib(end), "max": _mib(peak)}
    result["rss_growth_percent"] = round(100 * (end - start) / start, 2)
    result["rss_samples_mib"] = [(n, _mib(r)) for n, r in samples]
    return result


def stream(stack: RunningStack, work: Workload, count: int) -> dict:
    channel = connect(ClientSettings(stack.address, token=stack.predict_token))
    stub = refit_pb2_grpc.RefitStub(channel)
    requests = (
        pb.PredictRequest(image=work.image(i)[1], model=work.model, request_id=str(i))
        for i in range(count)
    )
    received = out_of_order = errors = wrong = 0
    start = time.perf_counter()
    for i, answer in enumerate(stub.PredictStream(requests, timeout=3600)):
        received += 1
        out_of_order += answer.request_id != str(i)
        if answer.error.code:
            errors += 1
        elif answer_key(answer) != work.reference[work.image(i)[0]]:
            wrong += 1
    seconds = time.perf_counter() - start
    channel.close()
    return {
        "sent": count,
        "received": received,
        "out_of_order": out_of_order,
        "errors": errors,
        "wrong": wrong,
        "seconds": round(seconds, 1),
        "images_per_second": round(received / seconds, 1),
    }


def _mib(n: int) -> float:
    return round(n / 2**20, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", choices=("tiny", "imagenet"), default="tiny")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--per-client", type=int, default=1000)
    parser.add_argument("--soak", type=int, default=20_000)
    parser.add_argument("--stream", type=int, default=10_000)
    args = parser.parse_args()
    results = {"model": args.model}
    with running_stack(trainer=args.model == "tiny") as stack:
        work = prepare(stack, args.model)
        results["load"] = clients(stack, work, args.clients, args.per_client)
        print(json.dumps({"load": results["load"]}), flush=True)
        results["soak"] = soak(stack, work, args.soak)
        print(json.dumps({"soak": results["soak"]}), flush=True)
        results["stream"] = stream(stack, work, args.stream)
        print(json.dumps({"stream": results["stream"]}), flush=True)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
