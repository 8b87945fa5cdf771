"""Identifiers are checked at the boundary: every RPC refuses traversal strings and malformed
names with INVALID_ARGUMENT, and nothing in the store changes.

The service here runs on the embedded FileStore, where a key with '..' used to resolve to another
model's records (the reported exploit), in front of a TorchServe and a trainer that are not there:
no request below may get far enough to need them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from refit.v1 import refit_pb2 as pb
from refit.v1 import refit_pb2_grpc
from service.server import RefitServer
from tests.service.conftest import connect, offline_settings, publish_records, start_service

TRAVERSALS = [
    "../../other/versions/1",
    "..",
    "../x",
    "/etc/passwd",
    "a/../b",
    "1/../../../other/default",
    "1\n",
    "",
]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = tmp_path_factory.mktemp("identifiers")
    publish_records(data, {"imagenet": ["1", "2"], "other": ["1", "2"]})
    return data


@pytest.fixture(scope="module")
def file_service(data_dir: Path) -> Iterator[RefitServer]:
    refit = start_service(offline_settings(data_dir), wait_ready=False)
    yield refit
    refit.stop()


@pytest.fixture(scope="module")
def api(file_service: RefitServer) -> Iterator[refit_pb2_grpc.RefitStub]:
    with connect(file_service.port) as channel:
        yield refit_pb2_grpc.RefitStub(channel)


def records(data_dir: Path) -> list[str]:
    root = data_dir / "objects" / "refit"
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*.json"))


def test_delete_version_cannot_reach_another_model(api, data_dir: Path) -> None:
    """The reported exploit: this deleted model other's default record."""
    before = records(data_dir)
    with pytest.raises(grpc.RpcError) as caught:
        api.DeleteVersion(
            pb.DeleteVersionRequest(model="imagenet", version="../../other/versions/1"), timeout=10
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "invalid version" in caught.value.details()
    assert records(data_dir) == before
    assert "registry/other/versions/1.json" in before


CALLS: dict[str, Callable[[refit_pb2_grpc.RefitStub, str], object]] = {
    "Predict model": lambda api, s: api.Predict(pb.PredictRequest(image=b"x", model=s)),
    "Predict version": lambda api, s: api.Predict(
        pb.PredictRequest(image=b"x", model="imagenet", version=s or "-")
    ),
    "GetModel": lambda api, s: api.GetModel(pb.GetModelRequest(name=s)),
    "Retrain model": lambda api, s: api.Retrain(
        pb.RetrainRequest(model=s, dataset_uri="s3://datasets/flowers")
    ),
    "Retrain dataset prefix": lambda api, s: api.Retrain(
        pb.RetrainRequest(model="flowers", dataset_uri=f"s3://datasets/{s or '/'}")
    ),
    "Retrain dataset bucket": lambda api, s: api.Retrain(
        pb.RetrainRequest(model="flowers", dataset_uri=f"s3://{s or '..'}/flowers")
    ),
    "Retrain base_version": lambda api, s: api.Retrain(
        pb.RetrainRequest(model="flowers", dataset_uri="s3://datasets/f", base_version=s or "-")
    ),
    "Retrain backbone": lambda api, s: api.Retrain(
        pb.RetrainRequest(model="flowers", dataset_uri="s3://datasets/f", backbone=s or "-")
    ),
    "GetJob": lambda api, s: api.GetJob(pb.GetJobRequest(id=s)),
    "ListJobs": lambda api, s: api.ListJobs(pb.ListJobsRequest(model=s or "-")),
    "WatchJob": lambda api, s: list(api.WatchJob(pb.WatchJobRequest(id=s))),
    "CancelJob": lambda api, s: api.CancelJob(pb.CancelJobRequest(id=s)),
    "SetDefaultVersion model": lambda api, s: api.SetDefaultVersion(
        pb.SetDefaultVersionRequest(model=s, version="1")
    ),
    "SetDefaultVersion version": lambda api, s: api.SetDefaultVersion(
        pb.SetDefaultVersionRequest(model="imagenet", version=s)
    ),
    "DeleteVersion model": lambda api, s: api.DeleteVersion(
        pb.DeleteVersionRequest(model=s, version="2")
    ),
    "DeleteVersion version": lambda api, s: api.DeleteVersion(
        pb.DeleteVersionRequest(model="imagenet", version=s)
    ),
}


@pytest.mark.parametrize("text", TRAVERSALS)
@pytest.mark.parametrize("call", CALLS)
def test_every_rpc_refuses_traversal_strings(api, data_dir: Path, call: str, text: str) -> None:
    before = records(data_dir)
    with pytest.raises(grpc.RpcError) as caught:
        CALLS[call](api, text)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    assert any(w in caught.value.details() for w in ("invalid", "required", "expected"))
    assert records(data_dir) == before


@pytest.mark.parametrize("text", TRAVERSALS)
def test_predict_stream_answers_each_bad_identifier_and_goes_on(api, text: str) -> None:
    requests = [
        pb.PredictRequest(image=b"x", model="imagenet", version=text or "-", request_id="v"),
        pb.PredictRequest(image=b"x", model=text, request_id="m"),
    ]
    answers = list(api.PredictStream(iter(requests), timeout=10))
    assert [a.request_id for a in answers] == ["v", "m"]
    assert [a.error.code for a in answers] == ["INVALID_ARGUMENT", "INVALID_ARGUMENT"]
