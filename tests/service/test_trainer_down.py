"""The service with no trainer behind it: Retrain and WatchJob fail UNAVAILABLE, naming the
trainer's address."""

from __future__ import annotations

import grpc
import pytest

from local_stack.torchserve import TorchServeProcess
from refit.v1 import refit_pb2 as pb
from refit.v1 import refit_pb2_grpc
from tests.conftest import MotoServer, free_port
from tests.service.conftest import connect, service_settings, start_service
from tests.service.retraining import (
    UNKNOWN_JOB,
    retrain,
)

pytestmark = pytest.mark.integration


def test_trainer_down_is_unavailable_with_a_hint(
    moto_server: MotoServer, refit_bucket: str, torchserve: TorchServeProcess
) -> None:
    nowhere = f"127.0.0.1:{free_port()}"
    settings = service_settings(moto_server, refit_bucket, torchserve, trainer_address=nowhere)
    refit = start_service(settings, wait_ready=False)
    try:
        with connect(refit.port) as channel:
            stub = refit_pb2_grpc.RefitStub(channel)
            with pytest.raises(grpc.RpcError) as caught:
                retrain(stub, "colours", "s3://data/colours")
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            assert f"trainer at {nowhere} could not take the call" in caught.value.details()
            with pytest.raises(grpc.RpcError) as caught:
                list(stub.WatchJob(pb.WatchJobRequest(id=UNKNOWN_JOB), timeout=10))
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        refit.stop()
