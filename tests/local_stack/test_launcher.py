"""`make up` end to end on free ports: the embedded store, a real TorchServe, the trainer, the
service, a real Prometheus and the CLI, all supervised: crashed components are restarted, a broken
non-default version does not stop `make up`, and `make down && make up` keeps the state.

The stack is started once for the module. What one test needs another to have done is a module
fixture (``retrained``, ``torchserve_recovered``, ``broken_version_restarted``) that each test
requests, so the tests pass in any order and each scenario runs exactly once."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import signal
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from cli import main as refit_cli
from cli.client import ClientSettings, connect
from local_stack.launcher import Stack
from local_stack.settings import StackSettings
from local_stack.torchserve import TorchServePorts
from refit.netutil import wait_serving
from refit.registry import Registry, VersionRecord
from refit.storage import StorageSettings
from refit.v1 import refit_pb2 as pb
from refit.v1 import refit_pb2_grpc
from tests.conftest import free_port, wait_until
from tests.deploy.helpers import series_read_by_dashboard_and_rules
from tests.trainer.synthetic import upload_colours

RECOVERY_BOUND_S = 90
# Series that exist only once their event happens, which this module's traffic never causes.
EVENT_ONLY = {
    "refit_dataset_bad_images_total": "no undecodable image in the test datasets",
    "refit_model_problem": "no model here has a default without a record",
}  # documented in docs/reliability.md, with the measured figures


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> StackSettings:
    return StackSettings(
        storage=StorageSettings(data_dir=tmp_path_factory.mktemp("stack") / "data"),
        grpc_address=f"127.0.0.1:{free_port()}",
        health_address=f"127.0.0.1:{free_port()}",
        metrics_address=f"127.0.0.1:{free_port()}",
        prometheus_address=f"127.0.0.1:{free_port()}",
        scrape_interval="1s",
        trainer_address=f"127.0.0.1:{free_port()}",
        trainer_health_address=f"127.0.0.1:{free_port()}",
        trainer_metrics_address=f"127.0.0.1:{free_port()}",
        torchserve=TorchServePorts(*(free_port() for _ in range(5))),
    )


@pytest.fixture(scope="module")
def stack(settings: StackSettings) -> Iterator[Stack]:
    if shutil.which("prometheus") is None:
        pytest.fail("prometheus is not installed; `make test` installs it (apt-get)")
    stack = Stack(settings)
    with pytest.MonkeyPatch.context() as env:
        for name in ("TOKEN", "TOKENS_FILE", "ADMIN_TOKEN", "PREDICT_TOKEN"):
            env.delenv(f"REFIT_{name}", raising=False)
        env.setenv("REFIT_DATA_DIR", str(settings.data_dir))  # as `make up` exports it
        try:
            stack.up()
            yield stack
        finally:
            stack.down()


def api_channel(settings: StackSettings) -> grpc.Channel:
    """As the CLI connects: with the admin token `make up` created."""
    return connect(ClientSettings.from_env(settings.grpc_address))


def prometheus_query(settings: StackSettings, query: str) -> list[dict]:
    url = f"http://{settings.prometheus_address}/api/v1/query?" + urllib.parse.urlencode(
        {"query": query}
    )
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.load(response)["data"]["result"]


def wait_for_series(settings: StackSettings, query: str, timeout_s: float = 30.0) -> list[dict]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if result := prometheus_query(settings, query):
            return result
        time.sleep(0.5)  # Prometheus scrapes every second
    raise AssertionError(f"Prometheus has no series for {query}")


@dataclass(frozen=True)
class Retrained:
    archives_at_up: list[Path]
    cli_answer: dict
    final: pb.Job
    restarted_s: float
    killed_service_pid: int


@pytest.fixture(scope="module")
def retrained(
    stack: Stack, settings: StackSettings, tmp_path_factory: pytest.TempPathFactory,
    coffee_jpeg: bytes,
) -> Retrained:  # fmt: skip
    """A Predict through the CLI, then a retrain of `colours` during whose WatchJob the service is
    SIGKILLed; watched again after supervisord restarts it. Also calls without a token."""
    archives = sorted((settings.data_dir / "objects" / "refit" / "archives").rglob("*.mar"))
    check_tokens(settings)
    image = tmp_path_factory.mktemp("cli") / "coffee.jpg"
    image.write_bytes(coffee_jpeg)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = refit_cli(["predict", str(image), "--address", settings.grpc_address, "--json"])
    assert code == 0, out.getvalue()
    dataset = upload_colours(settings.storage.open(), "datasets", "colours", train=12, val=4,
                             size=32)  # fmt: skip
    with api_channel(settings) as channel:
        api = refit_pb2_grpc.RefitStub(channel)
        hyper = pb.Hyperparameters(epochs=2, batch_size=16, crop_size=32)
        request = pb.RetrainRequest(model="colours", dataset_uri=dataset, hyperparameters=hyper)
        job = api.Retrain(request, timeout=30)
        service_pid = stack.supervisor.pid("service")
        with pytest.raises(grpc.RpcError) as caught:
            for event in api.WatchJob(pb.WatchJobRequest(id=job.id), timeout=300):
                if event.job.state != pb.QUEUED:
                    os.kill(service_pid, signal.SIGKILL)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        killed = time.monotonic()
        wait_serving(settings.grpc_address, 120)
        restarted = time.monotonic() - killed
        final = list(api.WatchJob(pb.WatchJobRequest(id=job.id), timeout=300))[-1].job
    # The restarted service counts from zero: one more Predict for Prometheus to see.
    assert refit_cli(["predict", str(image), "--address", settings.grpc_address]) == 0
    return Retrained(archives, json.loads(out.getvalue()), final, restarted, service_pid)


def test_up_predict_retrain_observe(
    stack: Stack, settings: StackSettings, retrained: Retrained
) -> None:
    """`make up` published the base model once and made private tokens; the CLI predicts; the
    service SIGKILLed during a WatchJob: the client sees UNAVAILABLE, supervisord restarts the
    service, and watching again follows the job to its end. Prometheus scraped all of it."""
    assert len(retrained.archives_at_up) == 1
    check_tokens(settings)
    answer = retrained.cli_answer
    assert answer["model"] == "imagenet" and answer["predictions"][0]["label"] == "espresso"
    print(f"service SIGKILLed during WatchJob: SERVING again after {retrained.restarted_s:.1f}s")
    assert stack.supervisor.pid("service") not in (None, retrained.killed_service_pid)
    final = retrained.final
    assert pb.JobState.Name(final.state) == "SUCCEEDED", final.error
    check_prometheus(settings, final)


ANSWERS_BEFORE_THE_KILL = 4  # every client is predicting
ANSWERS_AFTER_RECOVERY = 8  # the clients go on answering right after the first recovered call


@dataclass(frozen=True)
class Recovered:
    answers: list[tuple[float, object]]
    details: dict
    killed_at: float
    recovered_at: float | None
    java_pid: int


@pytest.fixture(scope="module")
def torchserve_recovered(stack: Stack, settings: StackSettings, coffee_jpeg: bytes) -> Recovered:
    """SIGKILL the Java server while 4 clients predict, and follow the clients until Predict
    answers again (at most RECOVERY_BOUND_S) and goes on answering."""
    stop, answers, details = threading.Event(), [], {}

    def client() -> None:
        with api_channel(settings) as channel:
            api = refit_pb2_grpc.RefitStub(channel)
            request = pb.PredictRequest(image=coffee_jpeg, model="imagenet", top_k=1)
            while not stop.is_set():
                try:
                    label = api.Predict(request, timeout=30).predictions[0].label
                    answers.append((time.monotonic(), label))
                except grpc.RpcError as exc:
                    answers.append((time.monotonic(), exc.code()))
                    details.setdefault(exc.code(), exc.details())
                    time.sleep(0.2)  # a client's backoff, not a wait for the test

    def labels_since(moment: float) -> list[float]:
        return [t for t, a in list(answers) if t > moment and isinstance(a, str)]

    threads = [threading.Thread(target=client) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        wait_until(lambda: len(labels_since(0)) >= ANSWERS_BEFORE_THE_KILL, 120, "answers")
        java = stack.torchserve.server_pid()
        os.kill(java, signal.SIGKILL)
        killed = time.monotonic()
        recovered = None
        with contextlib.suppress(TimeoutError):
            wait_until(lambda: labels_since(killed + 1), RECOVERY_BOUND_S, "recovery")
            recovered = min(labels_since(killed + 1))
            wait_until(lambda: len(labels_since(recovered)) >= ANSWERS_AFTER_RECOVERY, 60,
                       "answers after the recovery")  # fmt: skip
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)
    return Recovered(list(answers), details, killed, recovered, java)


def test_torchserve_killed_under_load_recovers_by_itself(
    stack: Stack, torchserve_recovered: Recovered
) -> None:
    """The clients get UNAVAILABLE (never a wrong answer), supervisord restarts TorchServe, the
    reconciler reloads the models, and Predict works again within RECOVERY_BOUND_S with no
    manual step."""
    run = torchserve_recovered
    after = [a for t, a in run.answers if t > run.killed_at]
    errors = {a for a in after if not isinstance(a, str)}
    assert run.recovered_at is not None, f"no answer {RECOVERY_BOUND_S}s after the kill: {errors}"
    print(
        f"TorchServe SIGKILLed under load: Predict answered again after "
        f"{run.recovered_at - run.killed_at:.1f}s ({len(run.answers)} calls, "
        f"{sum(not isinstance(a, str) for a in after)} errors)"
    )
    assert {a for _, a in run.answers if isinstance(a, str)} == {"espresso"}  # no wrong answer
    assert errors <= {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}, run.details
    assert stack.torchserve.server_pid() not in (None, run.java_pid)


@dataclass(frozen=True)
class Restarted:
    status_after_down: int
    up_output: str
    archives: list[Path]
    models_listing: str
    status_after_up: int


@pytest.fixture(scope="module")
def broken_version_restarted(
    stack: Stack, settings: StackSettings, retrained: Retrained
) -> Restarted:
    """imagenet v2, a non-default version whose archive TorchServe refuses, then `make down` and
    `make up` on the same data dir (with `colours` retrained before)."""
    store = settings.storage.open()
    registry = Registry(store, settings.bucket)
    garbage = b"not a model archive"
    key = Registry.archive_key("imagenet", hashlib.sha256(garbage).hexdigest())
    store.put(settings.bucket, key, garbage)
    registry.add(VersionRecord("imagenet", "2", key, registry.get("imagenet", "1").class_names))
    stack.down()
    status_after_down = stack.status()
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        stack.up()  # same data dir: models and jobs survive; the base model is not rebuilt
    listing = io.StringIO()
    with contextlib.redirect_stdout(listing):
        code = refit_cli(["models", "--address", settings.grpc_address])
    assert code == 0, listing.getvalue()
    return Restarted(status_after_down, out.getvalue(),
                    sorted((settings.data_dir / "objects").rglob("*.mar")), listing.getvalue(),
                    stack.status())  # fmt: skip


def test_broken_version_then_down_and_up_keeps_the_state(
    broken_version_restarted: Restarted,
) -> None:
    """A non-default version whose archive TorchServe refuses: `make up` still succeeds and
    names it. Models, jobs and versions survive `make down && make up`."""
    run = broken_version_restarted
    assert run.status_after_down == 1
    assert "imagenet v2 (not the default) cannot be loaded" in run.up_output, run.up_output
    assert len(run.archives) == 3  # imagenet v1, colours v1, the refused one: nothing rebuilt
    assert "imagenet  default v1" in run.models_listing, run.models_listing
    assert "colours  default v1" in run.models_listing, run.models_listing
    assert run.status_after_up == 0


def check_tokens(settings: StackSettings) -> None:
    """`make up` created private tokens; the service demands them; the CLI found them."""
    path = settings.data_dir / "tokens.env"
    assert path.stat().st_mode & 0o777 == 0o600
    anonymous = grpc.insecure_channel(settings.grpc_address)
    with anonymous, pytest.raises(grpc.RpcError) as caught:
        refit_pb2_grpc.RefitStub(anonymous).ListModels(pb.ListModelsRequest(), timeout=10)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


def check_prometheus(settings: StackSettings, job: pb.Job) -> None:
    """Every target is up and the key series exist with the values the job reported."""
    up = wait_for_series(settings, "count(up == 1) == 3 and count(up) == 3", timeout_s=60)
    assert float(up[0]["value"][1]) == 3
    predictions = wait_for_series(settings, 'refit_rpc_requests_total{method="Predict",code="OK"}')
    assert float(predictions[0]["value"][1]) >= 1
    jobs = wait_for_series(settings, 'refit_trainer_jobs_total{state="succeeded"}')
    assert float(jobs[0]["value"][1]) == 1
    # The gauge holds the last epoch's validation accuracy, the job's latest progress.
    last_epoch = job.progress
    assert last_epoch.epoch_end and last_epoch.epoch == last_epoch.epochs, last_epoch
    wait_until(
        lambda: [
            float(s["value"][1])
            for s in prometheus_query(settings, 'refit_trainer_accuracy{split="val"}')
        ] == [pytest.approx(last_epoch.val_accuracy)],
        30, f"refit_trainer_accuracy{{split=\"val\"}} == {last_epoch.val_accuracy}",
    )  # fmt: skip
    defaults = wait_for_series(settings, "refit_model_default_version_info")
    assert {s["metric"]["model"] for s in defaults} >= {"imagenet"}
    assert wait_for_series(settings, "ts_inference_requests_total > 0")
    assert wait_for_series(settings, "refit_dataset_objects_read_total > 0")
    assert wait_for_series(settings, "method:refit_rpc_error_ratio:rate5m")  # a recording rule


def test_every_series_the_dashboard_and_rules_read_has_data(
    stack: Stack, settings: StackSettings, retrained: Retrained,
    torchserve_recovered: Recovered, broken_version_restarted: Restarted,
) -> None:  # fmt: skip
    """After the module's traffic (predictions, a retrain, a TorchServe kill, a refused version,
    refused tokens) every series a panel or a rule reads exists in Prometheus, so no panel is
    empty because its metric is defined and never observed."""
    url = f"http://{settings.prometheus_address}/api/v1/label/__name__/values"
    with urllib.request.urlopen(url, timeout=5) as response:
        present = set(json.load(response)["data"])
    missing = {
        name
        for name in series_read_by_dashboard_and_rules()
        if not {name, f"{name}_count"} & present
    }
    torchserve = sorted(n for n in present if n.startswith("ts_") or n[:1].isupper())
    assert missing <= set(EVENT_ONLY), (sorted(missing - set(EVENT_ONLY)), torchserve)
