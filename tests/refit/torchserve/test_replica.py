"""ReplicaClient against a stand-in replica (a plain gRPC server), for what needs no TorchServe."""

from __future__ import annotations

import threading
import time
from concurrent import futures

import grpc

from refit.errors import DeadlineExceeded, RefitError, Unavailable
from refit.netutil import free_port
from refit.torchserve import TorchServeClient
from refit.torchserve_api import inference_pb2, inference_pb2_grpc


class SlowReplica(inference_pb2_grpc.InferenceAPIsServiceServicer):
    def __init__(self) -> None:
        self.entered = threading.Event()

    def Predictions(self, request: object, context: grpc.ServicerContext) -> object:
        self.entered.set()
        time.sleep(3)
        return inference_pb2.PredictionResponse(prediction=b"{}")


def test_a_predict_cut_by_the_replica_leaving_is_unavailable_so_it_is_retried() -> None:
    """A replica that leaves the DNS answer (killed, scaled in) has its channels closed with
    Predicts in flight: grpc ends those CANCELLED, which must read as UNAVAILABLE (the client
    then asks the next replica), not as an INTERNAL error handed to the caller."""
    slow = SlowReplica()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    inference_pb2_grpc.add_InferenceAPIsServiceServicer_to_server(slow, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    client = TorchServeClient(f"127.0.0.1:{port}", f"127.0.0.1:{free_port()}", timeout_s=10)
    replica = client.replicas()[0]
    outcome: list[BaseException] = []

    def predict() -> None:
        request = inference_pb2.PredictionsRequest(model_name="m", model_version="1")
        try:
            replica.predict(request, 10)
        except Exception as exc:
            outcome.append(exc)

    caller = threading.Thread(target=predict)
    try:
        caller.start()
        assert slow.entered.wait(5)
        replica.close()
        caller.join(10)
    finally:
        client.close()
        server.stop(0)
    assert len(outcome) == 1 and isinstance(outcome[0], Unavailable), outcome


class CancelledPastTheDeadline:
    """A replica whose stream ends CANCELLED once the caller's deadline has passed, as
    TorchServe's does when the grpc-timeout it was sent runs out first."""

    def predict(self, request: object, timeout_s: float) -> object:
        time.sleep(timeout_s + 0.05)
        raise RefitError("TorchServe predict failed for m v1: CANCELLED Stream removed")


def test_a_predict_cancelled_past_its_deadline_is_deadline_exceeded(monkeypatch) -> None:
    client = TorchServeClient(f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}")
    monkeypatch.setattr(client, "_in_turn", lambda: [CancelledPastTheDeadline()])
    try:
        client.predict("m", "1", b"image", 5, timeout_s=0.05)
    except DeadlineExceeded as exc:
        assert "m v1" in str(exc), exc
    else:
        raise AssertionError("no DeadlineExceeded")
    finally:
        client.close()


def test_a_predict_on_a_replica_that_already_left_is_unavailable() -> None:
    """Chosen just before the replica left, the call meets closed channels (grpc: ValueError)."""
    client = TorchServeClient(f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}")
    replica = client.replicas()[0]
    replica.close()
    request = inference_pb2.PredictionsRequest(model_name="m", model_version="1")
    try:
        replica.predict(request, 1.0)
    except Unavailable as exc:
        assert "left" in str(exc), exc
    else:
        raise AssertionError("no Unavailable")
    finally:
        client.close()
