"""The whole job: moto S3 -> train -> archive and weights -> TorchServe."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
import urllib.request
import uuid
import zipfile
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from refit.lineage import Parent
from refit.registry import Registry, VersionRecord
from refit.storage import S3Store
from tests.conftest import MotoServer, free_port
from tests.trainer.fitting import SIZE, small_config
from tests.trainer.synthetic import (
    CLASS_NAMES,
    colour_image,
    png_bytes,
    upload_colours,
)
from trainer.artifacts import TrainResult
from trainer.backbones import BackboneRegistry
from trainer.config import NO_FREEZE, TrainConfig
from trainer.engine import ProgressEvent
from trainer.finetune import resolve_freeze
from trainer.onnx_export import probabilities
from trainer.package import export_torchscript
from trainer.starting_point import build_model
from trainer.train import train_and_package
from trainer.weights import load_weights


@pytest.fixture(scope="module")
def job(moto_server: MotoServer) -> Iterator[tuple[S3Store, str, TrainResult, TrainConfig]]:
    store = S3Store(moto_server.settings)
    bucket = f"ft-{uuid.uuid4().hex[:10]}"
    uri = upload_colours(store, bucket, "colours", train=16, val=6, size=SIZE)
    config = small_config(dataset=uri, bucket=bucket, workers=1, log_every=2)
    events: list[ProgressEvent] = []
    result = train_and_package(config, store, on_event=events.append)
    assert any(e.kind == "batch" for e in events) and any(e.kind == "epoch" for e in events)
    yield store, bucket, result, config


@pytest.mark.integration
def test_job_stores_a_content_addressed_archive_weights_and_lineage(job) -> None:
    store, bucket, result, config = job
    assert result.class_names == CLASS_NAMES
    assert result.archive_key == Registry.archive_key("colours", result.archive_digest)
    assert store.stat(bucket, result.archive_key) is not None
    assert result.metrics["val_accuracy"] >= 0.75
    lineage = result.lineage
    assert lineage.backbone == "efficientnet_lite0" and lineage.frozen_depth == 10
    assert lineage.dataset_uri == config.dataset and lineage.dataset_objects == 88
    assert len(lineage.dataset_digest) == 64 and lineage.weights_key == result.weights_key
    assert lineage.start == "imagenet" and lineage.hyperparameters == config.hyperparameters()
    assert set(result.evaluation["per_class_accuracy"]) == set(CLASS_NAMES)
    meta = _archive_meta(store, bucket, result.archive_key)
    assert meta["class_names"] == CLASS_NAMES and meta["frozen_depth"] == 10
    assert meta["crop_size"] == SIZE and meta["resize_size"] == config.eval_resize
    assert meta["dataset"] == {
        "uri": config.dataset,
        "objects": 88,
        "digest": lineage.dataset_digest,
    }
    assert meta["hyperparameters"]["epochs"] == 4 and "val_accuracy" in meta["metrics"]


@pytest.mark.integration
def test_what_a_run_leaves_unset_comes_from_the_recipe(moto_server: MotoServer) -> None:
    """Retrain with no hyperparameters: the stored version records the recipe's choices."""
    store = S3Store(moto_server.settings)
    bucket = f"ft-{uuid.uuid4().hex[:10]}"
    uri = upload_colours(store, bucket, "colours", train=16, val=6, size=SIZE)
    config = small_config(dataset=uri, bucket=bucket, epochs=1, batch_size=None, crop_size=None,
                          augmentation=None)  # fmt: skip
    result = train_and_package(config, store)
    chosen = result.lineage.hyperparameters
    assert (chosen["epochs"], chosen["batch_size"]) == (1, 16)  # the run's, the recipe's
    assert (chosen["crop_size"], chosen["resize_size"]) == (96, 96)  # 48 px images, kept whole
    assert tuple(chosen["augmentation"]["crop_scale"]) == (1.0, 1.0)  # 16 a class: flips only
    assert (chosen["augmentation"]["mixup"], chosen["augmentation"]["cutmix"]) == (0.2, 1.0)
    assert result.lineage.frozen_depth == NO_FREEZE  # upscaled 2x: every layer trains
    assert _archive_meta(store, bucket, result.archive_key)["crop_size"] == 96


def _archive_meta(store: S3Store, bucket: str, key: str) -> dict:
    with zipfile.ZipFile(io.BytesIO(store.get(bucket, key))) as mar:
        return json.loads(mar.read("refit.json"))


@pytest.mark.integration
def test_exported_model_matches_the_stored_weights_in_eager_mode(job) -> None:
    """The archive's ONNX model is the stored weights' (exactly at fp32, within int8's error),
    and the version's precision, both accuracies and the export check are recorded."""
    store, bucket, result, config = job
    with zipfile.ZipFile(io.BytesIO(store.get(bucket, result.archive_key))) as mar:
        names = set(mar.namelist())
        exported = [n for n in ("model.onnx", "model.int8.onnx") if n in names]
        served = session_of(mar.read(exported[0]))
    meta = _archive_meta(store, bucket, result.archive_key)
    assert (meta["runtime"], meta["precision"]) == ("onnx", result.precision)
    assert exported == ["model.int8.onnx" if result.precision == "int8" else "model.onnx"]
    assert result.fp32_accuracy is not None and result.int8_accuracy is not None
    assert meta["serving"]["fp32_accuracy"] == result.fp32_accuracy
    assert result.metrics["export_top1_agreement"] >= 0.9995
    assert result.metrics["export_max_probability_diff"] <= 1e-4
    start = replace(config, init_from=f"colours:{result.version}")
    _publish(store, bucket, result)
    model, origin = build_model(start, store, CLASS_NAMES, BackboneRegistry())
    probe = torch.rand(4, 3, SIZE, SIZE)
    with torch.inference_mode():
        eager = torch.softmax(model.eval()(probe), dim=1).numpy()
    onnx_probs = probabilities(served, probe.numpy())
    assert np.abs(eager - onnx_probs).max() <= (1e-4 if result.precision == "fp32" else 0.1)
    traced = export_torchscript(model, SIZE)  # raises itself if traced != eager
    assert np.allclose(torch.softmax(traced(probe), dim=1).detach().numpy(), eager, atol=1e-4)
    assert origin.parent == Parent("colours", result.version, result.weights_key)


def session_of(model: bytes):
    import onnxruntime as ort

    return ort.InferenceSession(model, providers=["CPUExecutionProvider"])


def _publish(store: S3Store, bucket: str, result: TrainResult) -> None:
    Registry(store, bucket).add(
        VersionRecord(
            model=result.model,
            version=result.version,
            archive_key=result.archive_key,
            class_names=result.class_names,
            metrics=result.metrics,
            lineage=result.lineage,
        )
    )


@pytest.mark.integration
def test_a_published_version_is_a_starting_point_for_new_classes(job) -> None:
    store, bucket, result, config = job
    _publish(store, bucket, result)
    saved = load_weights(store, bucket, result.weights_key)["state_dict"]
    start = replace(config, init_from=f"colours:{result.version}")
    model, _ = build_model(start, store, ["a", "b", "c", "d", "e"], BackboneRegistry())
    body = {k: v for k, v in model.net.state_dict().items() if not k.startswith("_fc.")}
    assert all(torch.equal(v, saved[k]) for k, v in body.items())
    assert model.head().out_features == 5  # new classes: a new head on the carried-over body
    assert resolve_freeze(model.spec, None) == 10


# --- TorchServe, local to this module on free ports -----------------------------------------------


@pytest.fixture(scope="module")
def torchserve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    home = tmp_path_factory.mktemp("torchserve")
    store_dir = home / "model-store"
    store_dir.mkdir()
    names = ("inference", "management", "metrics", "grpc_i", "grpc_m")
    ports = {name: free_port() for name in names}
    config = home / "config.properties"
    config.write_text(
        "\n".join(
            [
                f"inference_address=http://127.0.0.1:{ports['inference']}",
                f"management_address=http://127.0.0.1:{ports['management']}",
                f"metrics_address=http://127.0.0.1:{ports['metrics']}",
                f"grpc_inference_port={ports['grpc_i']}",
                f"grpc_management_port={ports['grpc_m']}",
                "grpc_inference_address=127.0.0.1",
                "grpc_management_address=127.0.0.1",
                "enable_model_api=true",
                "disable_token_authorization=true",
                "metrics_mode=prometheus",
                f"model_store={store_dir}",
                f"allowed_urls=file://{home}/.*",
                "default_workers_per_model=1",
            ]
        )
        + "\n"
    )
    torchserve = str(Path(sys.executable).with_name("torchserve"))
    # TorchServe keeps its pid file in TMPDIR: a private one keeps other instances out of reach.
    (home / "tmp").mkdir()
    env = {**os.environ, "TMPDIR": str(home / "tmp")}
    start = [
        torchserve,
        "--start",
        "--ncs",
        "--ts-config",
        str(config),
        "--model-store",
        str(store_dir),
    ]
    # No pipes: the Java server inherits them and would keep run() waiting for their EOF.
    quiet = {"cwd": home, "env": env, "stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    subprocess.run(start, check=True, timeout=60, **quiet)
    try:
        _wait_for_ping(ports["inference"])
        yield {"home": home, "inference": ports["inference"], "management": ports["management"]}
    finally:
        subprocess.run([torchserve, "--stop"], check=False, timeout=60, **quiet)
        _wait_for_exit(home)


def _wait_for_ping(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"TorchServe did not answer /ping on port {port}")


def _wait_for_exit(home: Path, timeout: float = 30) -> None:
    """``torchserve --stop`` returns at once; the Java frontend exits a few seconds later."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = subprocess.run(["pgrep", "-f", f"ModelServer.*{home}/"], capture_output=True)
        if found.returncode != 0:
            return
        time.sleep(0.2)


@pytest.mark.integration
def test_archive_serves_the_dataset_classes_in_torchserve(job, torchserve) -> None:
    store, bucket, result, _ = job
    mar = torchserve["home"] / f"colours-{result.archive_digest[:12]}.mar"
    store.get_file(bucket, result.archive_key, mar)
    register = urllib.request.Request(
        f"http://127.0.0.1:{torchserve['management']}/models?url=file://{mar}"
        "&model_name=colours&initial_workers=1&synchronous=true",
        method="POST",
    )
    with urllib.request.urlopen(register, timeout=120) as response:
        assert response.status == 200
    rng = np.random.default_rng(42)
    hits = 0
    for label, name in enumerate(CLASS_NAMES):
        for _ in range(2):
            request = urllib.request.Request(
                f"http://127.0.0.1:{torchserve['inference']}/predictions/colours",
                data=png_bytes(colour_image(label, rng, SIZE)),
                headers={"Content-Type": "application/octet-stream"},
                method="POST",
            )
            with urllib.request.urlopen(request, timeout=60) as response:
                predictions = json.loads(response.read())["predictions"]
            assert {p["label"] for p in predictions} == set(CLASS_NAMES)
            hits += predictions[0]["label"] == name
    assert hits >= 6  # of 8; chance is 2
