"""The fine-tuning loop (in-memory data) and the whole job (moto S3 -> archive -> TorchServe)."""

from __future__ import annotations

import io
import itertools
import json
import os
import subprocess
import sys
import threading
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
from prometheus_client import REGISTRY

from refit.lineage import Lineage, Parent
from refit.registry import Registry, VersionRecord
from refit.storage import FileStore, S3Store
from tests.conftest import MotoServer, free_port
from tests.trainer.synthetic import (
    CLASS_NAMES,
    ColourDataset,
    colour_image,
    png_bytes,
    upload_colours,
)
from trainer.artifacts import TrainResult
from trainer.backbones import BackboneRegistry
from trainer.checkpoint import CheckpointStore, load_weights
from trainer.config import TrainConfig
from trainer.datasets import Datasets
from trainer.engine import EvalResult, ProgressEvent, TrainingCancelled
from trainer.finetune import FineTuneModel, resolve_freeze
from trainer.hardware import Hardware
from trainer.loop import fit
from trainer.package import export_torchscript
from trainer.preprocessing import Preprocessing
from trainer.schedule import OneCycle, Phase, plan_phases
from trainer.selection import EpochSelection
from trainer.starting_point import StartingPointError, build_model
from trainer.train import train_and_package
from trainer.transforms import eval_transform, train_transform

CPU = Hardware(device=torch.device("cpu"), amp_dtype=None, channels_last=False)
SIZE = 48


def _config(**changes: object) -> TrainConfig:
    base = TrainConfig(
        dataset="s3://mem/colours",
        out="colours",
        epochs=4,
        batch_size=16,
        crop_size=SIZE,
        workers=0,
        lr=3e-3,
        log_every=1,
    )
    return replace(base, **changes)


def _data(config: TrainConfig, train: int = 96, val: int = 32) -> Datasets:
    pre = Preprocessing.for_config(config)
    return Datasets(
        ColourDataset(train, train_transform(pre, config.augmentation), seed=1),
        ColourDataset(val, eval_transform(pre), seed=2),
    )


def _model(config: TrainConfig) -> FineTuneModel:
    torch.manual_seed(0)
    model, _ = build_model(config, None, list(CLASS_NAMES), BackboneRegistry())
    return model


# --- schedule and phases (pure logic) ------------------------------------------------------------


def test_one_cycle_warms_up_peaks_and_anneals() -> None:
    schedule = OneCycle(total_steps=100, pct_start=0.2, div=25, final_div=1000)
    values = [schedule(step) for step in range(101)]
    assert values[0] == pytest.approx(1 / 25)
    assert max(values) == pytest.approx(1.0) and values.index(max(values)) == 20
    assert values[100] == pytest.approx(1 / 1000)
    assert schedule(500) == pytest.approx(1 / 1000)  # a longer epoch than estimated is safe
    assert all(a >= b for a, b in itertools.pairwise(values[20:]))


def test_two_phase_plan_freezes_everything_then_unfreezes_at_a_lower_lr() -> None:
    config = _config(epochs=5, head_epochs=2, lr=1e-3, finetune_lr_scale=0.1)
    assert plan_phases(config, freeze=10, max_depth=17) == [
        Phase(0, 0, 2, 17, 1e-3),
        Phase(1, 2, 5, 10, pytest.approx(1e-4)),
    ]
    assert plan_phases(_config(epochs=3), 10, 17) == [Phase(0, 0, 3, 10, 3e-3)]


@pytest.mark.parametrize(
    ("accuracies", "images", "kept"),
    [
        ([0.5, 0.9, 0.89, 0.7], 400, 2),  # 0.89 is within one SE (0.015) of 0.9: the later wins
        ([0.5, 0.9, 0.85, 0.7], 400, 1),  # 0.85 is not: the top one stays
        ([0.6, 0.6, 0.6], 100, 2),  # ties go to the latest epoch
        ([0.5, 0.9, 0.88, 0.95], 400, 3),
        ([0.5, 0.9, 0.88, 0.95], 40, 3),
        ([0.5, 0.9, 0.88, 0.86], 40, 3),  # 40 images: SE 0.047, so 0.86 is still noise
    ],
)
def test_the_kept_epoch_is_the_latest_within_noise_of_the_top(
    accuracies: list[float], images: int, kept: int
) -> None:
    assert _kept_epoch(accuracies, images) == kept


def _kept_epoch(accuracies: list[float], images: int) -> int:
    selection, model = EpochSelection(), torch.nn.Linear(1, 1)
    for epoch, accuracy in enumerate(accuracies):
        result = EvalResult(loss=0.0, accuracy=accuracy, per_class_accuracy=[], confusion=[],
                            images=images)  # fmt: skip
        selection.record(epoch, result, model)
    return selection.epoch


# --- the loop on in-memory data ------------------------------------------------------------------


def test_tiny_run_learns_the_classes_well_above_chance() -> None:
    config = _config()
    events: list[ProgressEvent] = []
    result = fit(_model(config), _data(config), config, CPU, freeze=10, on_event=events.append)
    assert result.best.accuracy >= 0.9  # chance is 0.25
    assert len(result.history) == 4 and result.epochs_run == 4
    assert result.best_epoch == _kept_epoch([h["val_accuracy"] for h in result.history], 32)
    epoch_events = [e for e in events if e.kind == "epoch"]
    assert [e.epoch for e in epoch_events] == [0, 1, 2, 3]
    assert epoch_events[-1].val["accuracy"] == result.history[-1]["val_accuracy"]
    assert len(result.best.confusion) == 4 and sum(map(sum, result.best.confusion)) == 32
    gauge = REGISTRY.get_sample_value
    assert gauge("refit_trainer_epoch") == 4
    assert gauge("refit_trainer_accuracy", {"split": "val"}) == result.history[-1]["val_accuracy"]
    assert gauge("refit_trainer_images_per_second") > 0
    assert gauge("refit_trainer_data_wait_ratio") == result.history[-1]["data_wait_ratio"]


def test_a_final_training_batch_of_one_image_is_skipped_and_counted_as_read() -> None:
    # 17 images in batches of 16: the last batch holds one image, and BatchNorm cannot train on
    # one value per channel (EfficientNet's last stage is 1x1 at this crop size).
    config = _config(epochs=1)
    data = _data(config, train=17, val=8)
    events: list[ProgressEvent] = []
    result = fit(_model(config), data, config, CPU, freeze=10, on_event=events.append)
    epoch_end = next(e for e in events if e.kind == "epoch")
    assert epoch_end.batch == 1 and result.epochs_run == 1  # one step, then the epoch ended
    assert data.train.seen == 17  # the skipped image counts as read: a resume will not reread it


def test_two_phases_train_the_head_first_then_the_top_units() -> None:
    config = _config(epochs=2, head_epochs=1)
    model = _model(config)
    top = model.units()[-1]
    before = {k: v.clone() for k, v in top.state_dict().items()}
    after: dict[int, dict] = {}

    def on_event(event: ProgressEvent) -> None:
        if event.kind == "epoch":
            after[event.epoch] = {k: v.clone() for k, v in top.state_dict().items()}

    fit(model, _data(config), config, CPU, freeze=10, on_event=on_event)
    assert all(torch.equal(before[k], after[0][k]) for k in before)  # phase one: head only
    assert not all(torch.equal(before[k], after[1][k]) for k in before)  # phase two: unfrozen
    assert model.frozen_depth == 10


def test_early_stopping_ends_a_run_that_stops_improving(file_store: FileStore) -> None:
    # Head-only at a negligible LR: the validation accuracy cannot improve after epoch 0.
    file_store.ensure_bucket("refit")
    checkpoints = CheckpointStore(file_store, "refit", "run-stop")
    config = _config(epochs=6, lr=1e-12, patience=2)
    model = _model(config)
    data = _data(config, train=32, val=16)
    result = fit(model, data, config, CPU, freeze=model.max_depth(), checkpoints=checkpoints)
    # Equal accuracies: the kept epoch is the latest, the patience counts from the first.
    assert result.stopped_early and result.epochs_run == 3 and result.best_epoch == 2
    # A rerun of a stopped run resumes into "stopped": nothing more to train.
    events: list[ProgressEvent] = []
    again = fit(_model(config), data, config, CPU, freeze=model.max_depth(),
                checkpoints=checkpoints, on_event=events.append)  # fmt: skip
    assert not events and again.stopped_early and again.history == result.history


def test_checkpoint_then_resume_continues_at_the_next_epoch(file_store: FileStore) -> None:
    file_store.ensure_bucket("refit")
    checkpoints = CheckpointStore(file_store, "refit", "run-1")
    config = _config(epochs=3)
    stop = threading.Event()
    train_images = 64

    def cancel_after_epoch_one(event: ProgressEvent) -> None:
        if event.kind == "epoch" and event.epoch == 1:
            stop.set()

    with pytest.raises(TrainingCancelled):
        fit(
            _model(config),
            _data(config, train=train_images),
            config,
            CPU,
            freeze=10,
            checkpoints=checkpoints,
            on_event=cancel_after_epoch_one,
            cancel=stop.is_set,
        )
    saved = checkpoints.load()
    assert saved.state.next_epoch == 2 and saved.optimizer["state"] and saved.scheduler
    assert saved.data == {"epoch": 1, "seen": train_images}  # data position

    events: list[ProgressEvent] = []
    data = _data(config, train=train_images)
    model = _model(config)
    result = fit(
        model, data, config, CPU, freeze=10, checkpoints=checkpoints, on_event=events.append
    )
    assert {e.epoch for e in events} == {2}  # only the last epoch ran
    assert [h["epoch"] for h in result.history] == [0, 1, 2]
    assert result.history[:2] == saved.state.history
    assert data.train.epoch == 2
    assert checkpoints.load().state.next_epoch == 3


def test_a_version_without_stored_weights_points_to_its_backbone(file_store: FileStore) -> None:
    file_store.ensure_bucket("refit")
    record = VersionRecord(
        model="imagenet",
        version="1",
        archive_key="archives/imagenet/x.mar",
        class_names=["a", "b"],
        lineage=Lineage(backbone="efficientnet_lite0"),
    )
    Registry(file_store, "refit").add(record)
    config = _config(init_from="imagenet:1", bucket="refit")
    with pytest.raises(StartingPointError, match="--backbone efficientnet_lite0"):
        build_model(config, file_store, list(CLASS_NAMES), BackboneRegistry())


# --- the whole job: moto S3 -> train -> archive -> TorchServe ------------------------------------


@pytest.fixture(scope="module")
def job(moto_server: MotoServer) -> Iterator[tuple[S3Store, str, TrainResult, TrainConfig]]:
    store = S3Store(moto_server.settings)
    bucket = f"ft-{uuid.uuid4().hex[:10]}"
    uri = upload_colours(store, bucket, "colours", train=16, val=6, size=SIZE)
    config = _config(dataset=uri, bucket=bucket, workers=1, log_every=2)
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


def _archive_meta(store: S3Store, bucket: str, key: str) -> dict:
    with zipfile.ZipFile(io.BytesIO(store.get(bucket, key))) as mar:
        return json.loads(mar.read("refit.json"))


@pytest.mark.integration
def test_exported_model_matches_the_stored_weights_in_eager_mode(job) -> None:
    store, bucket, result, config = job
    with zipfile.ZipFile(io.BytesIO(store.get(bucket, result.archive_key))) as mar:
        scripted = torch.jit.load(io.BytesIO(mar.read("model.pt")))
    start = replace(config, init_from=f"colours:{result.version}")
    _publish(store, bucket, result)
    model, origin = build_model(start, store, CLASS_NAMES, BackboneRegistry())
    probe = torch.rand(4, 3, SIZE, SIZE)
    with torch.inference_mode():
        eager, exported = model.eval()(probe), scripted(probe)
    assert torch.allclose(eager, exported, atol=1e-4)
    traced = export_torchscript(model, SIZE)  # raises itself if traced != eager
    assert torch.allclose(traced(probe), eager, atol=1e-4)
    assert origin.parent == Parent("colours", result.version, result.weights_key)


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
