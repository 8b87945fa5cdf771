"""The fit loop: the phases' epochs, each one trained (``engine.train_one_epoch``), validated
(``engine.evaluate``), judged (``selection.py``), checkpointed and reported. A run resumes from
its last checkpoint: after an epoch, or within one (every ``checkpoint_interval_s``), where the
training dataset skips the images already consumed."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from trainer.checkpoint import Checkpoint, CheckpointStore, TrainingState
from trainer.config import TrainConfig
from trainer.datasets import Datasets, Loaders, steps_per_epoch
from trainer.engine import CancelCheck, Clock, EvalResult, EventSink, evaluate, train_one_epoch
from trainer.finetune import FineTuneModel
from trainer.hardware import Hardware, sum_across_ranks, sync_buffers
from trainer.reporting import history_entry, report_epoch
from trainer.schedule import Optimization, Phase, plan_phases
from trainer.transforms import batch_mix


@dataclass
class FitResult:
    best_epoch: int
    best: EvalResult
    history: list[dict] = field(default_factory=list)
    epochs_run: int = 0
    train_seconds: float = 0.0
    images_per_second: float = 0.0
    stopped_early: bool = False


def fit(
    model: FineTuneModel,
    data: Datasets,
    config: TrainConfig,
    hw: Hardware,
    *,
    freeze: int,
    checkpoints: CheckpointStore | None = None,
    on_event: EventSink | None = None,
    cancel: CancelCheck | None = None,
) -> FitResult:
    """Train with per-epoch validation, epoch selection, early stopping and checkpoints;
    leaves the kept epoch's weights in ``model``."""
    torch.manual_seed(config.seed)
    model.to(hw.device, memory_format=hw.memory_format())
    saved = checkpoints.load() if checkpoints is not None and config.resume else None
    if saved is not None:
        model.load_state_dict(saved.model)
        data.train.load_state_dict(saved.data)
    state = saved.state if saved is not None else TrainingState()
    epochs = _Epochs(model, data, config, hw, checkpoints, on_event, cancel)
    if epochs.ema is not None and saved is not None and saved.ema is not None:
        epochs.ema.load_state_dict(saved.ema)
    started = time.perf_counter()
    for phase in plan_phases(config, freeze, model.max_depth()):
        if not state.stopped_early and phase.end_epoch > state.next_epoch:
            epochs.run_phase(phase, state, saved)
    model.load_state_dict(state.selection.state)
    seconds = time.perf_counter() - started
    images = sum_across_ranks(torch.tensor([float(epochs.images)]), hw).item()  # the whole job's
    return FitResult(
        best_epoch=state.selection.epoch,
        best=state.selection.evaluation,
        history=state.history,
        epochs_run=state.next_epoch,
        train_seconds=seconds,
        images_per_second=images / seconds if seconds else 0.0,
        stopped_early=state.stopped_early,
    )


def weight_average(model: nn.Module, decay: float) -> AveragedModel | None:
    """An exponential moving average of ``model``'s weights and BatchNorm statistics, or None."""
    if decay == 0:
        return None
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


class _Epochs:
    """Runs one fit()'s epochs and writes its checkpoints."""

    def __init__(
        self,
        model: FineTuneModel,
        data: Datasets,
        config: TrainConfig,
        hw: Hardware,
        checkpoints: CheckpointStore | None,
        on_event: EventSink | None,
        cancel: CancelCheck | None,
    ) -> None:
        self.model, self.data, self.config, self.hw = model, data, config, hw
        self.checkpoints = checkpoints if hw.is_main else None  # rank 0 writes for all
        self.on_event, self.cancel = on_event, cancel
        self.steps = steps_per_epoch(data.train, config.batch_size, hw)
        self.clock = Clock(epochs=config.epochs, batches_per_epoch=self.steps)
        self.loaders = Loaders.for_datasets(data, config, hw)
        assert config.augmentation is not None, "complete the config first (trainer.recipe)"
        self.mix = batch_mix(config.augmentation, len(data.train.class_names))
        self.ema = weight_average(model, config.ema_decay)
        self.images = 0  # trained on by this rank, this run
        self.saved_at = time.monotonic()

    def run_phase(self, phase: Phase, state: TrainingState, saved: Checkpoint | None) -> None:
        steps = Optimization.for_phase(self.model, phase, self.config, self.hw, self.steps)
        if saved is not None and saved.phase == phase.index:
            steps.load_state_dict(saved.optimizer, saved.scheduler)
        for epoch in range(max(state.next_epoch, phase.first_epoch), phase.end_epoch):
            self.run_epoch(epoch, phase, steps, state)
            if state.stopped_early:
                return

    def run_epoch(
        self, epoch: int, phase: Phase, steps: Optimization, state: TrainingState
    ) -> None:
        self.data.train.set_epoch(epoch)  # keeps a resumed epoch's position

        def consumed(images: int) -> None:
            self.data.train.advance(images)
            if self._mid_epoch_checkpoint_due():
                self._save(phase, steps, state)

        stats = train_one_epoch(
            steps.model, steps.criterion, steps.optimizer, steps.scheduler, self.loaders.train,
            self.hw, epoch=epoch, clock=self.clock, scaler=steps.scaler, on_event=self.on_event,
            cancel=self.cancel, log_every=self.config.log_every, on_batch=consumed, mix=self.mix,
            ema=self.ema,
        )  # fmt: skip
        self.images += stats.images
        sync_buffers(self.model, self.hw)
        judged = self.model if self.ema is None else self.ema.module  # what would be served
        classes = len(self.data.train.class_names)
        result = evaluate(judged, nn.CrossEntropyLoss(), self.loaders.val, self.hw, classes)
        state.history.append(history_entry(epoch, stats, result))
        improved = state.selection.record(epoch, result, judged)
        state.next_epoch = epoch + 1
        state.stopped_early = state.selection.should_stop(improved, self.config.patience)
        self._save(phase, steps, state)
        report_epoch(self.on_event, epoch, stats, result, self.clock, self.hw)

    def _mid_epoch_checkpoint_due(self) -> bool:
        interval = self.config.checkpoint_interval_s
        return interval > 0 and time.monotonic() - self.saved_at >= interval

    def _save(self, phase: Phase, steps: Optimization, state: TrainingState) -> None:
        if self.checkpoints is not None:
            checkpoint = Checkpoint(
                state=state,
                phase=phase.index,
                model=self.model.state_dict(),
                optimizer=steps.optimizer.state_dict(),
                scheduler=steps.scheduler.state_dict(),
                data=self.data.train.state_dict(),
                ema=self.ema.state_dict() if self.ema is not None else None,
            )
            self.checkpoints.save(checkpoint)
        self.saved_at = time.monotonic()
