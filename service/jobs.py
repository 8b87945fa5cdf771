"""Retraining as the service sees it: forward job requests to the trainer, change defaults and
delete versions through refit.publish, and keep the model catalog in step with both.

The service never trains. The catalog is refreshed after each default change it makes, when a
watched job succeeds, and by ``JobMonitor`` whenever any job succeeds (the trainer promotes).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator

from refit.errors import InvalidArgument, RefitError
from refit.identifiers import check_job_id, check_model_name, check_version
from refit.publish import Publisher
from refit.storage import S3Uri
from refit.v1 import refit_pb2 as pb
from service.catalog import ModelCatalog, ModelEntry
from service.trainer_client import TrainerClient

log = logging.getLogger(__name__)


class Jobs:
    def __init__(self, trainer: TrainerClient, catalog: ModelCatalog, publisher: Publisher) -> None:
        self.trainer = trainer
        self.catalog = catalog
        self.publisher = publisher

    def retrain(self, request: pb.RetrainRequest) -> pb.Job:
        """Identifiers are checked here; the trainer checks the rest (backbone, dataset bucket,
        hyperparameter ranges) before it queues the job."""
        check_model_name(request.model)
        try:
            S3Uri.parse(request.dataset_uri)
        except ValueError as exc:
            raise InvalidArgument(f"dataset_uri: {exc}") from exc
        if request.base_version:
            check_version(request.base_version, "base_version")
        if request.backbone:
            check_version(request.backbone, "backbone")  # names, not paths: same rule
        return self.trainer.submit(request)

    def get(self, job_id: str) -> pb.Job:
        return self._seen(self.trainer.get_job(check_job_id(job_id)))

    def list(self, request: pb.ListJobsRequest) -> pb.ListJobsResponse:
        if request.model:
            check_model_name(request.model)
        return self.trainer.list_jobs(request)

    def cancel(self, job_id: str) -> pb.Job:
        return self.trainer.cancel_job(check_job_id(job_id))

    def watch(self, job_id: str, on_close: Callable[[Callable], object]) -> Iterator[pb.JobEvent]:
        """The trainer's event stream; ``on_close`` registers the cancel of the upstream call."""
        call = self.trainer.watch_job(check_job_id(job_id))
        on_close(call.cancel)
        for event in self.trainer.events(call):
            self._seen(event.job)
            yield event

    def set_default(self, model: str, version: str) -> ModelEntry:
        self.publisher.promote(check_model_name(model), check_version(version))
        self.catalog.refresh()
        return self.catalog.get(model)

    def delete_version(self, model: str, version: str) -> ModelEntry:
        self.publisher.delete_version(check_model_name(model), check_version(version))
        self.catalog.refresh()
        return self.catalog.get(model)

    def _seen(self, job: pb.Job) -> pb.Job:
        if job.state == pb.SUCCEEDED:
            self.catalog.refresh()  # the trainer may have published a new default
        return job


class JobMonitor:
    """Follows every job's state changes from the trainer; refreshes the catalog on success."""

    def __init__(self, trainer: TrainerClient, catalog: ModelCatalog) -> None:
        self.trainer = trainer
        self.catalog = catalog
        self._call = None

    def run_forever(self, stop: threading.Event, retry_s: float = 2.0) -> None:
        while not stop.is_set():
            try:
                self._call = self.trainer.subscribe()
                for event in self.trainer.events(self._call):
                    if event.job.state == pb.SUCCEEDED:
                        self.catalog.refresh()
            except RefitError as exc:
                if not stop.is_set():
                    log.debug("trainer subscription ended (%s); retrying", exc.message)
            except Exception:
                log.exception("job monitor failed; retrying")
            stop.wait(retry_s)

    def stop(self) -> None:
        if self._call is not None:
            self._call.cancel()
