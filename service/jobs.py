"""Retraining as the service sees it: forward job requests to the trainer, change defaults and
delete versions through refit.publish, and keep the model catalog in step with both.

The service never trains. WatchJob callers share the replica's one trainer subscription
(service/job_events.py). The catalog is refreshed after each default change made here, and by
that subscription once whenever a job succeeds (the trainer may have promoted its version).
GetJob and WatchJob answer from the job record: a SUCCEEDED job's version re-reads the registry
only when the catalog does not know it, through the catalog's throttled miss path.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

from refit.errors import InvalidArgument, RefitError
from refit.identifiers import check_job_id, check_model_name, check_version
from refit.publish import Publisher
from refit.storage import S3Uri
from refit.v1 import refit_pb2 as pb
from service.catalog import ModelCatalog, ModelEntry
from service.job_events import JobHub
from service.trainer_client import TrainerClient

log = logging.getLogger(__name__)


class Jobs:
    def __init__(
        self, trainer: TrainerClient, catalog: ModelCatalog, publisher: Publisher, hub: JobHub
    ) -> None:
        self.trainer = trainer
        self.catalog = catalog
        self.publisher = publisher
        self.hub = hub

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

    def watch(self, job_id: str, on_close: Callable[[Callable], bool]) -> Iterator[pb.JobEvent]:
        """The job's snapshot and events from the replica's trainer subscription; ``on_close``
        registers the end of the watch for when the caller goes away (False: gone already)."""
        watcher = self.hub.watch(check_job_id(job_id))
        if not on_close(watcher.close):
            watcher.close()
        for event in watcher:
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
        """A caller told SUCCEEDED may ask for the new version next: the catalog should know it.
        A version it knows costs nothing; one it does not takes the throttled miss path."""
        if job.state == pb.SUCCEEDED and job.version:
            try:
                self.catalog.resolve(job.model, job.version)
            except RefitError as exc:  # deleted since, or the store is down: the record answers
                log.debug("job %s: v%s not in the catalog (%s)", job.id, job.version, exc.message)
        return job
