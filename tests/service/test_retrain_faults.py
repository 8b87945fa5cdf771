"""Retraining under faults, with real processes: TorchServe down when a job reaches publishing,
the object store unreachable mid-training, a publish whose store write is refused, and a new
version's worker stopped before its smoke test.

Each job trains a tiny model (4 colour classes, 32 px) in an in-process trainer against the
session's TorchServe and S3 server; the store faults go through ``tests.faults.S3FaultProxy``."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
import uuid
from collections.abc import Iterator

import grpc
import pytest

from local_stack.torchserve import TorchServeProcess
from refit.lineage import Lineage
from refit.publish import Publisher, PublishFailed
from refit.registry import Registry
from refit.storage import S3Store, S3Uri
from refit.torchserve import TorchServeClient
from refit.trainer.v1 import trainer_pb2_grpc
from refit.v1 import refit_pb2 as pb
from tests.conftest import MotoServer
from tests.faults import S3FaultProxy
from tests.service.conftest import bucket_with_imagenet_archive
from tests.service.retraining import trainer_events, trainer_settings
from tests.trainer.synthetic import upload_colours
from trainer.server import TrainerServer, build_server

pytestmark = pytest.mark.integration
SIZE = 32
TINY = pb.Hyperparameters(epochs=2, batch_size=16, lr=3e-3, crop_size=SIZE)


@pytest.fixture(scope="module")
def dataset(moto_server: MotoServer) -> str:
    bucket = f"faults-{uuid.uuid4().hex[:8]}"
    return upload_colours(S3Store(moto_server.settings), bucket, "c", train=8, val=4, size=SIZE)


READ_RETRIES = "trainer.data.retry"  # logs each object-store read it retries


def start_trainer(settings) -> TrainerServer:
    server = build_server(settings)
    server.start()
    return server


def fast_retries(settings, **storage):
    return dataclasses.replace(
        settings, retry_backoff_s=1.0, publish_retry_s=0.5, gc_interval_s=0, **storage
    )


@pytest.fixture
def bucket() -> str:
    return f"fault-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def stub_for() -> Iterator:
    channels = []

    def open_stub(trainer: TrainerServer) -> trainer_pb2_grpc.TrainerStub:
        channels.append(grpc.insecure_channel(f"127.0.0.1:{trainer.port}"))
        return trainer_pb2_grpc.TrainerStub(channels[-1])

    yield open_stub
    for channel in channels:
        channel.close()


def submit(stub, model: str, dataset: str) -> pb.Job:
    request = pb.RetrainRequest(model=model, dataset_uri=dataset, hyperparameters=TINY)
    return stub.Submit(request, timeout=30)


def test_torchserve_down_when_a_job_reaches_publishing(
    moto_server: MotoServer, torchserve: TorchServeProcess, dataset: str, bucket: str, stub_for
) -> None:
    """The version is recorded, the job waits and says so, and it is published once TorchServe
    returns: no training is lost."""
    trainer = start_trainer(
        fast_retries(trainer_settings(moto_server, bucket, torchserve, dataset))
    )
    try:
        stub = stub_for(trainer)
        job = submit(stub, "patient", dataset)
        events = trainer_events(stub, job.id, timeout=600)
        for event in events:
            if event.job.state == pb.TRAINING:
                torchserve.stop()  # long before publishing: no race with the job
                break
        waiting = None
        for event in events:
            if event.job.state == pb.PUBLISHING and "waiting for TorchServe" in event.job.detail:
                waiting = event.job
                break
        assert waiting is not None, "the job never said it waits for TorchServe"
        record = Registry(S3Store(moto_server.settings), bucket).get("patient", waiting.version)
        assert record.lineage.job_id == job.id  # recorded while TorchServe is away
        retried = next((e.job for e in events if "attempt 2," in e.job.detail), None)
        assert retried is not None, "the job did not retry while TorchServe was down"
        torchserve.start()
        final = [e.job for e in events][-1]
        served = {(v.model, v.version) for v in trainer.torchserve.served_versions()}
    finally:
        torchserve.start()
        trainer.stop()
    assert final.state == pb.SUCCEEDED, final.error
    assert final.attempts == 1 and final.gate.promoted and not final.detail
    assert ("patient", final.version) in served


def test_object_store_unreachable_mid_training_then_back(
    moto_server, torchserve, s3_proxy: S3FaultProxy, dataset, bucket, stub_for, caplog
) -> None:
    """A short outage after the first epoch, until a read has failed and is retried: the reads
    retry with backoff and the job goes on to publish exactly one version. (A longer one
    interrupts the job, which runs again from its checkpoint: tests/trainer/jobs/test_manager.py
    and the test below.)"""
    caplog.set_level(logging.WARNING, logger=READ_RETRIES)
    settings = fast_retries(trainer_settings(moto_server, bucket, torchserve, dataset))
    trainer = start_trainer(
        dataclasses.replace(settings, storage=s3_proxy.behind(settings.storage))
    )
    # Each image read takes 0.1 s, so epoch 2's reads span seconds: the cut meets one.
    s3_proxy.slow_reads(f"/{S3Uri.parse(dataset).bucket}/", 0.1)
    try:
        stub = stub_for(trainer)
        job = submit(stub, "resilient", dataset)
        events = trainer_events(stub, job.id, timeout=600)
        for event in events:
            if event.job.progress.epoch_end and event.job.progress.epoch == 1:
                break
        # The epoch's checkpoint goes up after its event: cut once it is stored, so the outage
        # meets the next epoch's reads (a failed checkpoint write would interrupt the job).
        root = S3Store(moto_server.settings)
        checkpoint = f"checkpoints/{job.id}/last.pt"
        wait_deadline = time.monotonic() + 60
        while root.stat(bucket, checkpoint) is None:
            assert time.monotonic() < wait_deadline, "epoch 1's checkpoint never landed"
            time.sleep(0.05)
        s3_proxy.cut()
        deadline = time.monotonic() + 120
        while not [r for r in caplog.records if r.name == READ_RETRIES]:
            assert time.monotonic() < deadline, "no read met the outage"
            time.sleep(0.05)
        s3_proxy.restore()
        final = [e.job for e in events][-1]
    finally:
        s3_proxy.slow_reads("", 0.0)
        s3_proxy.restore()
        trainer.stop()
    assert final.state == pb.SUCCEEDED, final.error
    versions = Registry(S3Store(moto_server.settings), bucket).versions("resilient")
    assert [(v.version, v.lineage.job_id) for v in versions] == [("1", job.id)]
    store = S3Store(moto_server.settings)
    assert not list(store.list(bucket, f"checkpoints/{job.id}/"))  # deleted once published


def test_object_store_gone_for_good_fails_the_job_with_the_reason(
    moto_server, torchserve, s3_proxy: S3FaultProxy, dataset, bucket, stub_for
) -> None:
    """A lasting outage: after its attempts the job fails, saying why; nothing is published."""
    settings = fast_retries(
        trainer_settings(moto_server, bucket, torchserve, dataset), max_attempts=1
    )
    trainer = start_trainer(
        dataclasses.replace(settings, storage=s3_proxy.behind(settings.storage))
    )
    try:
        stub = stub_for(trainer)
        job = submit(stub, "doomed", dataset)
        events = trainer_events(stub, job.id, timeout=600)
        for event in events:
            if event.job.state == pb.TRAINING:
                s3_proxy.cut()
                break
        final = [e.job for e in events][-1]
    finally:
        s3_proxy.restore()
        trainer.stop()
    assert final.state == pb.FAILED and final.attempts == 1
    assert "object store did not answer" in final.error and "gave up after 1 attempt" in final.error
    store = S3Store(moto_server.settings)
    assert not list(store.list(bucket, "registry/doomed/"))
    assert not list(store.list(bucket, "archives/doomed/"))


def test_a_publish_whose_store_write_is_refused_fails_and_keeps_the_default(
    moto_server, torchserve, s3_proxy: S3FaultProxy, dataset, refit_bucket, bucket, stub_for
) -> None:
    store = S3Store(moto_server.settings)
    store.ensure_bucket(bucket)
    base = Registry(store, refit_bucket).get("imagenet", "1")
    registry = Registry(store, bucket)
    registry.add(dataclasses.replace(base, model="guarded", version="1", lineage=Lineage()))
    registry.set_default("guarded", "1")
    settings = fast_retries(trainer_settings(moto_server, bucket, torchserve, dataset))
    trainer = start_trainer(
        dataclasses.replace(settings, storage=s3_proxy.behind(settings.storage))
    )
    s3_proxy.refuse_puts(f"/{bucket}/registry/")
    try:
        stub = stub_for(trainer)
        job = submit(stub, "guarded", dataset)
        final = list(trainer_events(stub, job.id, timeout=600))[-1].job
    finally:
        s3_proxy.refuse_puts(None)
        trainer.stop()
    assert final.state == pb.FAILED
    assert "publishing v2 failed" in final.error and "AccessDenied" in final.error
    assert registry.default_version("guarded") == "1"
    assert [v.version for v in registry.versions("guarded")] == ["1"]
    assert json.loads(store.get(bucket, "registry/guarded/default.json")) == {"version": "1"}


class StopsEachNewVersion(TorchServeClient):
    """A TorchServe where, as a service over its worker budget may do, something scales each
    version to 0 workers right after it loads (before the publisher's smoke test)."""

    def register(self, model: str, version: str, url: str, **options) -> None:
        super().register(model, version, url, **options)
        self.scale(model, version, 0, timeout_s=30)


def test_a_version_stopped_between_loading_and_its_smoke_test_is_still_published(
    moto_server: MotoServer, torchserve: TorchServeProcess, refit_bucket: str, cat_jpeg: bytes
) -> None:
    store, bucket, base = bucket_with_imagenet_archive(moto_server, refit_bucket, "stopped")
    record = dataclasses.replace(base, model=f"stopped-{uuid.uuid4().hex[:6]}", lineage=Lineage())
    ports = torchserve.ports
    client = StopsEachNewVersion(
        f"127.0.0.1:{ports.grpc_inference}",
        f"127.0.0.1:{ports.grpc_management}",
        management_rest=f"127.0.0.1:{ports.management}",
        keys=torchserve.key_source(),
    )
    try:
        decision = Publisher(store, bucket, client).publish(record, baseline=lambda _: None)
        answer = client.predict(record.model, record.version, cat_jpeg, top_k=1)
    finally:
        client.close()
    assert decision.promote
    assert Registry(store, bucket).default_version(record.model) == record.version
    assert answer["predictions"][0]["label"] in record.class_names


def test_a_publish_whose_archive_was_changed_never_reaches_torchserve(
    moto_server: MotoServer, torchserve: TorchServeProcess, refit_bucket: str
) -> None:
    """The archive's content no longer hashes to its key (changed after the trainer stored it):
    the publish fails before TorchServe is asked to load it, and nothing stays recorded."""
    store, bucket, base = bucket_with_imagenet_archive(moto_server, refit_bucket, "changed")
    model = f"changed-{uuid.uuid4().hex[:6]}"
    key = Registry.archive_key(model, "0" * 64)
    store.put(bucket, key, store.get(bucket, base.archive_key))  # a valid archive, wrong content
    record = dataclasses.replace(base, model=model, archive_key=key, lineage=Lineage())
    ports = torchserve.ports
    client = TorchServeClient(
        f"127.0.0.1:{ports.grpc_inference}",
        f"127.0.0.1:{ports.grpc_management}",
        keys=torchserve.key_source(),
    )
    try:
        with pytest.raises(PublishFailed, match="changed after it was stored"):
            Publisher(store, bucket, client).publish(record, baseline=lambda _: None)
        assert all(model not in replica.model_names() for replica in client.replicas())
    finally:
        client.close()
    assert list(Registry(store, bucket).versions(model)) == []
