"""What one retraining job does: train (resuming from its checkpoint), then publish and gate.

The job's id is its training run id, so a job interrupted by a trainer restart continues from its
last checkpoint; its version is pinned when it first starts, so it publishes the same one.
Once trained, the version is recorded before TorchServe is asked to load it: a job that a restart
interrupts while publishing resumes from that record without training again, and a TorchServe
outage only makes the job wait (it says so in its ``detail``). An object store that stops
answering mid-training interrupts the job, which runs again from its checkpoint (see manager.py).
The checkpoint is deleted once the version is published.

With ``REFIT_TRAINER_PROCESSES_PER_JOB`` > 1 the training runs as that many torchrun processes
(trainer/jobs/processes.py); everything else here is the same for both.
"""

from __future__ import annotations

import math
from dataclasses import replace

from refit.errors import InvalidArgument, RefitError
from refit.publish import Publisher
from refit.registry import Registry, RegistryError, VersionRecord
from refit.storage import ObjectStore
from trainer.config import TrainConfig
from trainer.jobs.admission import check_dataset, check_hyperparameters, check_starting_point
from trainer.jobs.context import JobContext
from trainer.jobs.failures import describe, is_outage, is_store_error, training_error
from trainer.jobs.records import (
    EXPORTING,
    PUBLISHING,
    TRAINING,
    JobCancelled,
    JobFailed,
    JobInterrupted,
    JobRecord,
)
from trainer.jobs.request import batching_for, train_config
from trainer.jobs.settings import TrainerSettings


class TrainingRunner:
    def __init__(self, settings: TrainerSettings, store: ObjectStore, publisher: Publisher) -> None:
        self.settings = settings
        self.store = store
        self.publisher = publisher

    def validate(self, request: dict) -> None:
        """Everything a job could fail on before training is refused here (admission.py)."""
        check_hyperparameters(request.get("hyperparameters", {}))
        try:
            config = train_config(request, self.settings)
        except (ValueError, TypeError) as exc:
            raise InvalidArgument(f"invalid retrain request: {exc}") from exc
        try:
            batching_for(request, self.settings)
        except ValueError as exc:
            raise InvalidArgument(f"batching: {exc}") from exc
        check_dataset(self.store, config.dataset)
        check_starting_point(self.store, config, request.get("base_version", ""))

    def run(self, job: JobRecord, context: JobContext) -> None:
        try:
            self._run(job, context)
        except (JobCancelled, JobFailed, JobInterrupted):
            raise
        except Exception as exc:
            if is_outage(exc):
                raise JobInterrupted(f"the object store did not answer: {describe(exc)}") from exc
            raise

    def _run(self, job: JobRecord, context: JobContext) -> None:
        registry = Registry(self.store, self.settings.bucket)
        version = job.version or registry.next_version(job.model)
        context.update(version=version)
        config = train_config(job.request, self.settings, job_id=job.id, version=version)
        record = self._recorded(registry, job, version)
        if record is None:
            result = self._train(config, context)
            context.set_state(PUBLISHING)
            context.update(metrics=result.metrics)
            record = VersionRecord(
                model=result.model,
                version=result.version,
                archive_key=result.archive_key,
                class_names=result.class_names,
                metrics=result.metrics,
                lineage=replace(
                    result.lineage,
                    base_version=job.request.get("base_version", ""),
                    created_by=job.request.get("created_by", ""),
                    job_id=job.id,
                ),
                batching=batching_for(job.request, self.settings),
                precision=result.precision,
                fp32_accuracy=result.fp32_accuracy,
                int8_accuracy=result.int8_accuracy,
            )
        else:
            context.set_state(PUBLISHING)  # trained and recorded before a restart
        from trainer.checkpoint import CheckpointStore
        from trainer.jobs.gate import evaluate_default

        decision = self._publish(
            record,
            lambda default: evaluate_default(self.store, config, record.class_names, default),
            bool(job.request.get("force", False)),
            context,
        )
        context.update(gate=decision.as_dict())
        CheckpointStore(self.store, self.settings.bucket, job.id).delete()

    def abandon(self, job: JobRecord) -> None:
        if job.version:
            self.publisher.withdraw(job.model, job.version)

    @staticmethod
    def _recorded(registry: Registry, job: JobRecord, version: str) -> VersionRecord | None:
        """The record this job added before it was interrupted, if any."""
        try:
            record = registry.get(job.model, version)
        except RegistryError:
            return None
        return record if record.lineage.job_id == job.id else None

    def _train(self, config: TrainConfig, context: JobContext):
        sink = _ProgressSink(context, self.settings.log_every)
        if self.settings.processes_per_job > 1:
            from trainer.jobs.processes import Launch, train_in_processes

            return train_in_processes(
                config, Launch(self.settings.processes_per_job), self.settings.storage,
                on_event=sink, cancelled=context.cancelled, wait=context.wait,
            )  # fmt: skip
        from trainer.train import train_and_package

        try:
            return train_and_package(config, self.store, on_event=sink, cancel=context.cancelled)
        except Exception as exc:
            error = training_error(exc)
            if error is None:
                raise
            raise error from exc

    def _publish(self, record: VersionRecord, baseline, force: bool, context: JobContext):
        def wait(reason: str, seconds: float) -> None:
            context.detail(reason)
            context.wait(seconds)
            if context.stopping():
                raise JobCancelled("the trainer is stopping; the job resumes at its next start")

        try:
            return self.publisher.publish(
                record, baseline=baseline, margin=self.settings.gate_margin, force=force, wait=wait
            )
        except JobCancelled:
            raise
        except RefitError as exc:
            raise JobFailed(f"publishing v{record.version} failed: {exc.message}") from exc
        except Exception as exc:
            if not is_outage(exc) and is_store_error(exc):  # e.g. the record's write refused
                raise JobFailed(
                    f"publishing v{record.version} failed: the object store refused it "
                    f"({describe(exc)})"
                ) from exc
            raise


class _ProgressSink:
    """Engine progress events -> job state (TRAINING, then EXPORTING after the last epoch)."""

    def __init__(self, context: JobContext, every: int) -> None:
        self.context = context
        self.every = max(every, 1)  # batches between progress events sent to watchers
        self.training = False

    def __call__(self, event) -> None:
        if not self.training:
            self.training = True
            self.context.set_state(TRAINING)
        epoch_end = event.kind == "epoch"
        if not epoch_end and event.batch % self.every:
            return
        val = event.val or {}
        eta = event.eta_seconds if math.isfinite(event.eta_seconds) else -1.0
        self.context.progress(
            {
                "epoch": event.epoch + 1,
                "epochs": event.epochs,
                "batch": event.batch,
                "batches": event.batches,
                "loss": event.loss,
                "accuracy": event.accuracy,
                "images_per_second": event.images_per_second,
                "eta_seconds": eta,
                "val_loss": val.get("loss", 0.0),
                "val_accuracy": val.get("accuracy", 0.0),
                "epoch_end": epoch_end,
            },
            persist=epoch_end,
        )
        if epoch_end and event.epoch + 1 >= event.epochs:
            self.context.set_state(EXPORTING)
