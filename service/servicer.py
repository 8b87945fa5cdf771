"""Thin gRPC servicer: proto <-> domain conversion only; errors are mapped by the front door
(service/frontdoor.py), which runs these methods on its threads."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from refit.errors import to_status
from refit.registry import VersionRecord
from refit.v1 import refit_pb2 as pb
from refit.v1 import refit_pb2_grpc
from service.catalog import ModelCatalog, ModelEntry
from service.jobs import Jobs
from service.metrics import observe_payload
from service.predictions import Predictor, PredictResult, ordered_map
from service.reconciler import Reconciler
from service.rotation import FAILED, REGISTERED


class RefitServicer(refit_pb2_grpc.RefitServicer):
    def __init__(
        self,
        predictor: Predictor,
        catalog: ModelCatalog,
        stream_window: int,
        jobs: Jobs,
        reconciler: Reconciler,
    ) -> None:
        self.predictor = predictor
        self.catalog = catalog
        self.jobs = jobs
        self.reconciler = reconciler
        self.stream_window = stream_window
        self._stream_pool = ThreadPoolExecutor(max_workers=4 * stream_window)

    def Predict(
        self, request: pb.PredictRequest, context: grpc.ServicerContext
    ) -> pb.PredictResponse:
        result = self._predict(request, context, "Predict")
        return _predict_response(request.request_id, result)

    def PredictStream(
        self, requests: Iterator[pb.PredictRequest], context: grpc.ServicerContext
    ) -> Iterator[pb.PredictResponse]:
        def answer(request: pb.PredictRequest) -> pb.PredictResponse:
            try:
                result = self._predict(request, context, "PredictStream")
                return _predict_response(request.request_id, result)
            except Exception as exc:
                code, message = to_status(exc)
                error = pb.Error(code=code.name, message=message)
                return pb.PredictResponse(request_id=request.request_id, error=error)

        yield from ordered_map(answer, requests, self._stream_pool, self.stream_window)

    def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.ServicerContext
    ) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(
            models=[_model(e, self.reconciler) for e in self.catalog.models()]
        )

    def GetModel(self, request: pb.GetModelRequest, context: grpc.ServicerContext) -> pb.Model:
        entry = self.catalog.get(request.name, wait_s=context.time_remaining())
        return _model(entry, self.reconciler)

    # --- retraining: forwarded to the trainer; defaults and deletion via refit.publish ---

    def Retrain(self, request: pb.RetrainRequest, context: grpc.ServicerContext) -> pb.Job:
        return self.jobs.retrain(request)

    def GetJob(self, request: pb.GetJobRequest, context: grpc.ServicerContext) -> pb.Job:
        return self.jobs.get(request.id)

    def ListJobs(
        self, request: pb.ListJobsRequest, context: grpc.ServicerContext
    ) -> pb.ListJobsResponse:
        return self.jobs.list(request)

    def WatchJob(
        self, request: pb.WatchJobRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.JobEvent]:
        yield from self.jobs.watch(request.id, context.add_callback)

    def CancelJob(self, request: pb.CancelJobRequest, context: grpc.ServicerContext) -> pb.Job:
        return self.jobs.cancel(request.id)

    def SetDefaultVersion(
        self, request: pb.SetDefaultVersionRequest, context: grpc.ServicerContext
    ) -> pb.Model:
        return _model(self.jobs.set_default(request.model, request.version), self.reconciler)

    def DeleteVersion(
        self, request: pb.DeleteVersionRequest, context: grpc.ServicerContext
    ) -> pb.Model:
        return _model(self.jobs.delete_version(request.model, request.version), self.reconciler)

    def _predict(
        self, request: pb.PredictRequest, context: grpc.ServicerContext, method: str
    ) -> PredictResult:
        observe_payload(method, len(request.image))
        return self.predictor.predict(
            request.image,
            request.model,
            request.version,
            request.top_k,
            timeout_s=context.time_remaining(),
        )


def _predict_response(request_id: str, result: PredictResult) -> pb.PredictResponse:
    return pb.PredictResponse(
        request_id=request_id,
        model=result.model,
        version=result.version,
        predictions=[
            pb.Prediction(label=p.label, score=p.score, index=p.index) for p in result.predictions
        ],
    )


_REGISTRATIONS = {
    REGISTERED: pb.ModelVersion.REGISTERED,
    FAILED: pb.ModelVersion.REGISTRATION_FAILED,
}


def _model(entry: ModelEntry, reconciler: Reconciler) -> pb.Model:
    versions = []
    for record in entry.versions:
        version = _version(record, record.version == entry.default_version)
        registration = reconciler.registration(entry.name, record.version)
        version.registration = _REGISTRATIONS.get(registration.state, pb.ModelVersion.PENDING)
        version.registration_error = registration.error
        version.registration_attempts = registration.attempts
        version.replicas.extend(
            pb.ReplicaRegistration(
                replica=r.replica,
                registration=_REGISTRATIONS.get(r.state, pb.ModelVersion.PENDING),
                error=r.error,
                attempts=r.attempts,
            )
            for r in reconciler.registrations(entry.name, record.version)
        )
        versions.append(version)
    default = next((v for v in versions if v.is_default), None)
    return pb.Model(
        name=entry.name,
        default_version=entry.default_version or "",
        versions=versions,
        default_served=default is not None
        and any(r.registration == pb.ModelVersion.REGISTERED for r in default.replicas),
        problem=reconciler.problem(entry.name),
    )


def _version(record: VersionRecord, is_default: bool) -> pb.ModelVersion:
    created = Timestamp()
    created.FromDatetime(datetime.fromisoformat(record.created_at))
    lineage = record.lineage
    return pb.ModelVersion(
        version=record.version,
        is_default=is_default,
        class_names=record.class_names,
        metrics=record.metrics,
        lineage=pb.Lineage(
            backbone=lineage.backbone,
            base_version=lineage.base_version,
            dataset_uri=lineage.dataset_uri,
            dataset_digest=lineage.dataset_digest,
            dataset_objects=lineage.dataset_objects,
            hyperparameters={k: str(v) for k, v in lineage.hyperparameters.items()},
            created_by=lineage.created_by,
            job_id=lineage.job_id,
        ),
        created_at=created,
        archive_key=record.archive_key,
        state="serving" if is_default else "candidate",
        batching=pb.Batching(
            batch_size=record.batching.batch_size,
            max_batch_delay_ms=record.batching.max_batch_delay_ms,
        ),
        precision=pb.PRECISION_INT8 if record.precision == "int8" else pb.PRECISION_FP32,
        fp32_accuracy=record.fp32_accuracy,
        int8_accuracy=record.int8_accuracy,
    )
