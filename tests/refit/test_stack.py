"""`make up` end to end on free ports: the embedded store, a real TorchServe, the service, the CLI;
then `make down && make up` keeps the state."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest

from refit.cli import main as refit_cli
from refit.stack import Stack, StackSettings
from refit.storage import StorageSettings
from refit.torchserve_process import TorchServePorts
from tests.conftest import free_port


def test_up_predict_down_up(
    tmp_path: Path, coffee_jpeg: bytes, capsys: pytest.CaptureFixture
) -> None:
    settings = StackSettings(
        storage=StorageSettings(data_dir=tmp_path / "data"),
        grpc_address=f"127.0.0.1:{free_port()}",
        metrics_address=f"127.0.0.1:{free_port()}",
        prometheus_address=f"127.0.0.1:{free_port()}",
        trainer_address=f"127.0.0.1:{free_port()}",
        trainer_metrics_address=f"127.0.0.1:{free_port()}",
        torchserve=TorchServePorts(*(free_port() for _ in range(5))),
    )
    image = tmp_path / "coffee.jpg"
    image.write_bytes(coffee_jpeg)
    stack = Stack(settings)
    try:
        stack.up()
        archives = sorted((tmp_path / "data" / "objects" / "refit" / "archives").rglob("*.mar"))
        assert len(archives) == 1
        capsys.readouterr()
        argv = ["predict", str(image), "--address", settings.grpc_address, "--json"]
        assert refit_cli(argv) == 0
        answer = json.loads(capsys.readouterr().out)
        assert answer["model"] == "imagenet" and answer["predictions"][0]["label"] == "espresso"
        metrics = urllib.request.urlopen(f"http://{settings.metrics_address}/metrics").read()
        assert b'refit_rpc_requests_total{code="OK",method="Predict"}' in metrics

        stack.down()
        assert stack.status() == 1
        stack.up()  # same data dir: the published model is reused, not rebuilt
        assert sorted((tmp_path / "data" / "objects").rglob("*.mar")) == archives
        assert refit_cli(["models", "--address", settings.grpc_address]) == 0
        assert "imagenet  default v1" in capsys.readouterr().out
    finally:
        stack.down()
