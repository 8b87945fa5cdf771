"""`make up` end to end on free ports: the embedded store, a real TorchServe, the trainer, the
service, a real Prometheus and the CLI; then `make down && make up` keeps the state."""

from __future__ import annotations

import json
import shutil
import time
import urllib.parse
import urllib.request
from pathlib import Path

import grpc
import pytest

from refit.cli import main as refit_cli
from refit.client import ClientSettings, connect
from refit.stack import Stack, StackSettings
from refit.storage import StorageSettings
from refit.torchserve_process import TorchServePorts
from refit.v1 import refit_pb2 as pb
from refit.v1 import refit_pb2_grpc
from tests.conftest import free_port
from tests.trainer.synthetic import upload_colours


@pytest.fixture
def settings(tmp_path: Path) -> StackSettings:
    return StackSettings(
        storage=StorageSettings(data_dir=tmp_path / "data"),
        grpc_address=f"127.0.0.1:{free_port()}",
        metrics_address=f"127.0.0.1:{free_port()}",
        prometheus_address=f"127.0.0.1:{free_port()}",
        scrape_interval="1s",
        trainer_address=f"127.0.0.1:{free_port()}",
        trainer_metrics_address=f"127.0.0.1:{free_port()}",
        torchserve=TorchServePorts(*(free_port() for _ in range(5))),
    )


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
        time.sleep(0.5)
    raise AssertionError(f"Prometheus has no series for {query}")


def retrain_tiny_model(settings: StackSettings) -> pb.Job:
    store = settings.storage.open()
    dataset = upload_colours(store, "datasets", "colours", train=12, val=4, size=32)
    with connect(ClientSettings.from_env(settings.grpc_address)) as channel:
        api = refit_pb2_grpc.RefitStub(channel)
        hyper = pb.Hyperparameters(epochs=1, batch_size=16, crop_size=32)
        job = api.Retrain(
            pb.RetrainRequest(model="colours", dataset_uri=dataset, hyperparameters=hyper),
            timeout=30,
        )
        events = list(api.WatchJob(pb.WatchJobRequest(id=job.id), timeout=300))
    return events[-1].job


def test_up_predict_retrain_observe_down_up(
    settings: StackSettings,
    tmp_path: Path,
    coffee_jpeg: bytes,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if shutil.which("prometheus") is None:
        pytest.fail("prometheus is not installed; `make test` installs it (apt-get)")
    for name in ("REFIT_TOKEN", "REFIT_TOKENS_FILE", "REFIT_ADMIN_TOKEN", "REFIT_PREDICT_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("REFIT_DATA_DIR", str(settings.data_dir))  # as `make up` exports it
    image = tmp_path / "coffee.jpg"
    image.write_bytes(coffee_jpeg)
    stack = Stack(settings)
    try:
        stack.up()
        archives = sorted((tmp_path / "data" / "objects" / "refit" / "archives").rglob("*.mar"))
        assert len(archives) == 1
        check_tokens(settings)
        capsys.readouterr()
        argv = ["predict", str(image), "--address", settings.grpc_address, "--json"]
        assert refit_cli(argv) == 0
        answer = json.loads(capsys.readouterr().out)
        assert answer["model"] == "imagenet" and answer["predictions"][0]["label"] == "espresso"

        job = retrain_tiny_model(settings)
        assert pb.JobState.Name(job.state) == "SUCCEEDED", job.error
        check_prometheus(settings)

        stack.down()
        assert stack.status() == 1
        stack.up()  # same data dir: models and jobs survive; the base model is not rebuilt
        assert len(sorted((tmp_path / "data" / "objects").rglob("*.mar"))) == 2
        assert refit_cli(["models", "--address", settings.grpc_address]) == 0
        listing = capsys.readouterr().out
        assert "imagenet  default v1" in listing and "colours  default v1" in listing
    finally:
        stack.down()


def check_tokens(settings: StackSettings) -> None:
    """`make up` created private tokens; the service demands them; the CLI found them."""
    path = settings.data_dir / "tokens.env"
    assert path.stat().st_mode & 0o777 == 0o600
    anonymous = grpc.insecure_channel(settings.grpc_address)
    with anonymous, pytest.raises(grpc.RpcError) as caught:
        refit_pb2_grpc.RefitStub(anonymous).ListModels(pb.ListModelsRequest(), timeout=10)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


def check_prometheus(settings: StackSettings) -> None:
    """Every target is up and the key series exist with sensible values."""
    up = wait_for_series(settings, "count(up == 1) == 3 and count(up) == 3", timeout_s=60)
    assert float(up[0]["value"][1]) == 3
    predictions = wait_for_series(settings, 'refit_rpc_requests_total{method="Predict",code="OK"}')
    assert float(predictions[0]["value"][1]) >= 1
    jobs = wait_for_series(settings, 'refit_trainer_jobs_total{state="succeeded"}')
    assert float(jobs[0]["value"][1]) == 1
    accuracy = wait_for_series(settings, 'refit_trainer_accuracy{split="val"}')
    assert 0.0 <= float(accuracy[0]["value"][1]) <= 1.0
    defaults = wait_for_series(settings, "refit_model_default_version_info")
    assert {s["metric"]["model"] for s in defaults} >= {"imagenet"}
    assert wait_for_series(settings, "ts_inference_requests_total > 0")
    assert wait_for_series(settings, "refit_dataset_objects_read_total > 0")
    assert wait_for_series(settings, "method:refit_rpc_error_ratio:rate5m")  # a recording rule
