"""No single broken model takes serving down (issues 11 and 23): a version whose archive
TorchServe refuses, a model whose *default* archive TorchServe refuses, one whose archive was
changed after it was stored, a default that names no version record and a record that does not
parse sit next to the healthy `imagenet` model. The
service must still become SERVING, keep answering for imagenet, report each problem (GetModel,
metrics) and retry the refused versions with backoff.

Before per-version reconciling, the first refused registration aborted every pass: health stayed
NOT_SERVING for all models (and `make up` failed after 300 s). Before issue 23, a default refused
everywhere kept every replica out of line: health stayed NOT_SERVING (`wait_serving` timed out)."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator

import grpc
import pytest
from prometheus_client import REGISTRY

from local_stack.torchserve import TorchServeProcess
from refit.registry import Registry, VersionRecord
from refit.v1 import refit_pb2 as pb
from refit.v1 import refit_pb2_grpc
from service.server import RefitServer
from tests.conftest import MotoServer
from tests.service.conftest import (
    bucket_with_imagenet_archive,
    connect,
    service_settings,
    start_service,
)

pytestmark = pytest.mark.integration
GARBAGE = b"this is not a model archive"
REFUSED_DEFAULT = b"this is not a model archive either"


@pytest.fixture(scope="module")
def broken_bucket(moto_server: MotoServer, refit_bucket: str) -> str:
    """imagenet v1 (healthy default) and v2 (a broken archive), plus three broken models."""
    store, name, source = bucket_with_imagenet_archive(moto_server, refit_bucket, "broken")
    for key in ("registry/imagenet/versions/1.json", "registry/imagenet/default.json"):
        store.put(name, key, store.get(refit_bucket, key))
    registry = Registry(store, name)
    bad_key = Registry.archive_key("imagenet", hashlib.sha256(GARBAGE).hexdigest())
    store.put(name, bad_key, GARBAGE)
    registry.add(VersionRecord("imagenet", "2", bad_key, source.class_names))
    refused_key = Registry.archive_key("refused", hashlib.sha256(REFUSED_DEFAULT).hexdigest())
    store.put(name, refused_key, REFUSED_DEFAULT)
    registry.add(VersionRecord("refused", "1", refused_key, source.class_names))
    registry.set_default("refused", "1")
    # A valid archive stored under a key that names other content: changed after it was stored.
    tampered_key = Registry.archive_key("tampered", hashlib.sha256(GARBAGE * 2).hexdigest())
    store.put(name, tampered_key, store.get(name, source.archive_key))
    registry.add(VersionRecord("tampered", "1", tampered_key, source.class_names))
    registry.set_default("tampered", "1")
    store.put(name, "registry/orphaned/default.json", json.dumps({"version": "5"}).encode())
    store.put(name, "registry/unreadable/versions/1.json", b"{not json")
    return name


@pytest.fixture(scope="module")
def service(
    moto_server: MotoServer, broken_bucket: str, torchserve: TorchServeProcess
) -> Iterator[RefitServer]:
    settings = service_settings(moto_server, broken_bucket, torchserve, reconcile_retry_s=0.5)
    refit = start_service(settings, wait_ready=False)
    yield refit
    refit.stop()


@pytest.fixture(scope="module")
def api(service: RefitServer) -> Iterator[refit_pb2_grpc.RefitStub]:
    with connect(service.port) as channel:
        yield refit_pb2_grpc.RefitStub(channel)


def test_broken_models_do_not_take_serving_down(service: RefitServer, api, cat_jpeg) -> None:
    from tests.service.conftest import wait_serving

    wait_serving(service.port, timeout_s=90)
    answer = api.Predict(pb.PredictRequest(image=cat_jpeg, model="imagenet"), timeout=30)
    assert answer.version == "1" and 281 <= answer.predictions[0].index <= 285


def test_the_refused_version_is_reported_and_retried_with_backoff(service, api) -> None:
    deadline = time.monotonic() + 60
    while True:
        model = api.GetModel(pb.GetModelRequest(name="imagenet"), timeout=10)
        v1, v2 = model.versions
        if v2.registration_attempts >= 3 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert model.default_served and not model.problem
    assert v1.registration == pb.ModelVersion.REGISTERED and v1.state == "serving"
    assert v2.registration == pb.ModelVersion.REGISTRATION_FAILED and v2.state == "candidate"
    assert v2.registration_error and v2.registration_attempts >= 3
    with pytest.raises(grpc.RpcError) as caught:
        api.Predict(pb.PredictRequest(image=b"\xff\xd8\xff", model="imagenet", version="2"))
    assert caught.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INVALID_ARGUMENT)
    replica = service.torchserve.replicas()[0].name
    labels = {"model": "imagenet", "state": "failed", "replica": replica}
    assert REGISTRY.get_sample_value("refit_model_versions_not_served", labels) == 1
    failures = REGISTRY.get_sample_value("refit_registration_failures_total", {"model": "imagenet"})
    assert failures >= 3


def test_a_default_without_a_record_is_the_models_problem(service, api) -> None:
    model = api.GetModel(pb.GetModelRequest(name="orphaned"), timeout=10)
    assert model.default_version == "5" and not model.default_served
    assert "no version record" in model.problem and "refit promote orphaned" in model.problem
    assert REGISTRY.get_sample_value("refit_model_problem", {"model": "orphaned"}) == 1


def test_an_unreadable_record_is_the_models_problem(service, api) -> None:
    names = {m.name: m for m in api.ListModels(pb.ListModelsRequest(), timeout=10).models}
    assert {"imagenet", "orphaned", "unreadable"} <= set(names)
    assert "cannot be read" in names["unreadable"].problem
    assert REGISTRY.get_sample_value("refit_model_problem", {"model": "unreadable"}) == 1


def test_a_default_refused_everywhere_is_the_models_problem(service, api, cat_jpeg) -> None:
    deadline = time.monotonic() + 60
    while True:
        model = api.GetModel(pb.GetModelRequest(name="refused"), timeout=10)
        if model.problem or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert not model.default_served
    assert "v1" in model.problem and "refused" in model.problem, model.problem
    assert model.versions[0].registration == pb.ModelVersion.REGISTRATION_FAILED
    assert REGISTRY.get_sample_value("refit_model_problem", {"model": "refused"}) == 1
    replica = service.torchserve.replicas()[0].name
    assert REGISTRY.get_sample_value("refit_torchserve_replica_in_rotation", {"replica": replica})
    answer = api.Predict(pb.PredictRequest(image=cat_jpeg, model="imagenet"), timeout=30)
    assert answer.version == "1"


def test_an_archive_changed_after_it_was_stored_is_never_registered(service, api) -> None:
    """Its content no longer hashes to its key: TorchServe never gets it (it would run its
    handler), whatever TorchServe would have made of it."""
    deadline = time.monotonic() + 60
    while True:
        (v1,) = api.GetModel(pb.GetModelRequest(name="tampered"), timeout=10).versions
        if v1.registration_attempts >= 2 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert v1.registration == pb.ModelVersion.REGISTRATION_FAILED, v1
    assert "changed after it was stored" in v1.registration_error
    assert all("tampered" not in r.model_names() for r in service.torchserve.replicas())
