"""The fit loop on in-memory data: learning, phases, early stopping, checkpoints and resuming."""

from __future__ import annotations

import threading
from dataclasses import replace

import pytest
import torch
from PIL import Image
from prometheus_client import REGISTRY

from refit.storage import FileStore, S3Store
from tests.trainer.data.helpers import ident, image_objects, upload_images
from tests.trainer.fitting import CPU, colour_data, colour_model, kept_epoch, small_config
from trainer.checkpoint import CheckpointStore
from trainer.config import Augmentation
from trainer.datasets import open_datasets
from trainer.engine import ProgressEvent, TrainingCancelled
from trainer.loop import fit


def test_tiny_run_learns_the_classes_well_above_chance() -> None:
    config = small_config()
    events: list[ProgressEvent] = []
    data = colour_data(config)
    result = fit(colour_model(config), data, config, CPU, freeze=10, on_event=events.append)
    assert result.best.accuracy >= 0.9  # chance is 0.25
    assert len(result.history) == 4 and result.epochs_run == 4
    assert result.best_epoch == kept_epoch([h["val_accuracy"] for h in result.history], 32)
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
    config = small_config(epochs=1)
    data = colour_data(config, train=17, val=8)
    events: list[ProgressEvent] = []
    result = fit(colour_model(config), data, config, CPU, freeze=10, on_event=events.append)
    epoch_end = next(e for e in events if e.kind == "epoch")
    assert epoch_end.batch == 1 and result.epochs_run == 1  # one step, then the epoch ended
    assert data.train.seen == 17  # the skipped image counts as read: a resume will not reread it


def test_mixup_and_cutmix_runs_still_learn_the_classes() -> None:
    config = small_config(augmentation=Augmentation(mixup=0.2, cutmix=1.0))
    result = fit(colour_model(config), colour_data(config), config, CPU, freeze=10)
    assert result.best.accuracy >= 0.9


def test_with_a_weight_average_the_average_is_validated_and_kept() -> None:
    # A long-horizon average over a short run stays near the untrained start: it scores near
    # chance, and the weights left in the model are the average's, not the last step's.
    config = small_config(ema_decay=0.999)
    model = colour_model(config)
    start = _head_weights(model)
    trained = fit(colour_model(config), colour_data(config), replace(config, ema_decay=0), CPU,
                  freeze=10)  # fmt: skip
    averaged = fit(model, colour_data(config), config, CPU, freeze=10)
    assert trained.best.accuracy >= 0.9 and averaged.best.accuracy <= 0.6
    drift = (_head_weights(model) - start).abs().max().item()
    assert 0 < drift < 0.1 * start.abs().max().item()


def _head_weights(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.head().parameters()])


def test_two_phases_train_the_head_first_then_the_top_units() -> None:
    config = small_config(epochs=2, head_epochs=1)
    model = colour_model(config)
    top = model.units()[-1]
    before = {k: v.clone() for k, v in top.state_dict().items()}
    after: dict[int, dict] = {}

    def on_event(event: ProgressEvent) -> None:
        if event.kind == "epoch":
            after[event.epoch] = {k: v.clone() for k, v in top.state_dict().items()}

    fit(model, colour_data(config), config, CPU, freeze=10, on_event=on_event)
    assert all(torch.equal(before[k], after[0][k]) for k in before)  # phase one: head only
    assert not all(torch.equal(before[k], after[1][k]) for k in before)  # phase two: unfrozen
    assert model.frozen_depth == 10


def test_early_stopping_ends_a_run_that_stops_improving(file_store: FileStore) -> None:
    # Head-only at a negligible LR: the validation accuracy cannot improve after epoch 0.
    file_store.ensure_bucket("refit")
    checkpoints = CheckpointStore(file_store, "refit", "run-stop")
    config = small_config(epochs=6, lr=1e-12, patience=2)
    model = colour_model(config)
    data = colour_data(config, train=32, val=16)
    result = fit(model, data, config, CPU, freeze=model.max_depth(), checkpoints=checkpoints)
    # Equal accuracies: the kept epoch is the latest, the patience counts from the first.
    assert result.stopped_early and result.epochs_run == 3 and result.best_epoch == 2
    # A rerun of a stopped run resumes into "stopped": nothing more to train.
    events: list[ProgressEvent] = []
    again = fit(colour_model(config), data, config, CPU, freeze=model.max_depth(),
                checkpoints=checkpoints, on_event=events.append)  # fmt: skip
    assert not events and again.stopped_early and again.history == result.history


def test_checkpoint_then_resume_continues_at_the_next_epoch(file_store: FileStore) -> None:
    file_store.ensure_bucket("refit")
    checkpoints = CheckpointStore(file_store, "refit", "run-1")
    config = small_config(epochs=3)
    stop = threading.Event()
    train_images = 64

    def cancel_after_epoch_one(event: ProgressEvent) -> None:
        if event.kind == "epoch" and event.epoch == 1:
            stop.set()

    with pytest.raises(TrainingCancelled):
        fit(
            colour_model(config),
            colour_data(config, train=train_images),
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
    data = colour_data(config, train=train_images)
    model = colour_model(config)
    result = fit(
        model, data, config, CPU, freeze=10, checkpoints=checkpoints, on_event=events.append
    )
    assert {e.epoch for e in events} == {2}  # only the last epoch ran
    assert [h["epoch"] for h in result.history] == [0, 1, 2]
    assert result.history[:2] == saved.state.history
    assert data.train.epoch == 2
    assert checkpoints.load().state.next_epoch == 3


def test_a_resumed_run_continues_its_weight_average(file_store: FileStore) -> None:
    file_store.ensure_bucket("refit")
    checkpoints = CheckpointStore(file_store, "refit", "run-ema")
    config = small_config(epochs=2, ema_decay=0.9)
    stop = threading.Event()

    def stop_after_one(event: ProgressEvent) -> None:
        if event.kind == "epoch":
            stop.set()

    with pytest.raises(TrainingCancelled):
        fit(colour_model(config), colour_data(config, train=64), config, CPU, freeze=10,
            checkpoints=checkpoints, on_event=stop_after_one, cancel=stop.is_set)  # fmt: skip
    assert checkpoints.load().ema["n_averaged"].item() == 4  # 64 images, batches of 16
    fit(colour_model(config), colour_data(config, train=64), config, CPU, freeze=10,
        checkpoints=checkpoints)  # fmt: skip
    assert checkpoints.load().ema["n_averaged"].item() == 8  # both epochs' steps


# --- mid-epoch resume, streaming from a real S3 server -------------------------------------------


class Crash(Exception):
    """Stands for the process dying: raised from inside the data pipeline, so nothing after it
    runs (no checkpoint, no cleanup); what is left is what the store holds."""


class RecordingTransform:
    """Notes the id of every training image the dataset yields; optionally crashes the run just
    before yielding image number ``crash_at``."""

    def __init__(self, crash_at: int | None = None) -> None:
        self.ids: list[int] = []
        self.crash_at = crash_at

    def __call__(self, image: Image.Image) -> torch.Tensor:
        if len(self.ids) == self.crash_at:
            raise Crash
        self.ids.append(int(ident(image)))
        return torch.rand(3, 64, 64)


def test_a_run_killed_mid_epoch_resumes_there_and_trains_on_every_image_once(
    s3_store: S3Store, bucket: str, file_store: FileStore
) -> None:
    train = image_objects({"a": 12, "b": 12}, prefix="ds/train/")
    upload_images(s3_store, bucket, train)
    upload_images(s3_store, bucket, image_objects({"a": 2, "b": 2}, prefix="ds/val/", start=100))
    config = small_config(dataset=f"s3://{bucket}/ds", epochs=2, batch_size=4,
                          checkpoint_interval_s=1e-9)  # a checkpoint after every batch  # fmt: skip
    file_store.ensure_bucket("refit")
    checkpoints = CheckpointStore(file_store, "refit", "run-mid")

    def run(recorder: RecordingTransform) -> None:
        data = open_datasets(config, s3_store, CPU, recorder, lambda _: torch.rand(3, 64, 64))
        model = colour_model(config)
        fit(model, data, config, CPU, freeze=model.max_depth(), checkpoints=checkpoints)

    # Epoch 0 (24 images), then two batches of epoch 1, and two images into its third batch.
    first = RecordingTransform(crash_at=24 + 10)
    with pytest.raises(Crash):
        run(first)
    saved = checkpoints.load()
    assert saved.state.next_epoch == 1 and len(saved.state.history) == 1  # epoch 0 is done
    assert saved.data["epoch"] == 1 and saved.data["samples_seen"] == 8  # two batches of four

    second = RecordingTransform()
    run(second)
    epoch_1 = first.ids[24 : 24 + 8] + second.ids  # trained on before the crash, then after
    assert sorted(epoch_1) == sorted(ident for _, ident, _ in train.values())
    assert len(second.ids) == 24 - 8  # the images read before the crash are not read again
    final = checkpoints.load()
    assert final.state.next_epoch == 2 and [h["epoch"] for h in final.state.history] == [0, 1]
    assert final.scheduler["last_epoch"] == 2 * 6  # the LR schedule went on mid-epoch too
