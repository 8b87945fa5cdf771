"""Bearer tokens and roles over real gRPC: who may call what, what the others get back, what is
counted and what is never logged. The RPC list is read from the proto, so a new RPC is covered
(and needs admin) without touching this file."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client import REGISTRY

from cli.client import ClientSettings, connect
from refit.tokens import TokenConfigError, create_tokens_file, read_tokens_file
from refit.v1 import refit_pb2 as pb
from refit.v1 import refit_pb2_grpc
from service.auth import PREDICT_RPCS, Authenticator, AuthSettings
from service.config import ServiceSettings
from service.server import RefitServer
from tests.service.conftest import ADMIN_TOKEN, PREDICT_TOKEN, offline_settings, start_service

METHODS = pb.DESCRIPTOR.services_by_name["Refit"].methods
ADMIN_ONLY = sorted(m.name for m in METHODS if m.name not in PREDICT_RPCS)
SECOND_ADMIN_TOKEN = "rotated-admin-token-0123456789"


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RefitServer]:
    auth = AuthSettings((ADMIN_TOKEN, SECOND_ADMIN_TOKEN), (PREDICT_TOKEN,))
    refit = start_service(offline_settings(tmp_path_factory.mktemp("auth"), auth=auth), False)
    yield refit
    refit.stop()


def call(service: RefitServer, method: str, token: str) -> grpc.StatusCode:
    """Calls ``method`` with an empty request; returns the status (OK or the error's code)."""
    descriptor = METHODS[[m.name for m in METHODS].index(method)]
    request_type = getattr(pb, descriptor.input_type.name)
    with connect(ClientSettings(f"127.0.0.1:{service.port}", token=token)) as channel:
        stub = refit_pb2_grpc.RefitStub(channel)
        rpc = getattr(stub, method)
        try:
            if descriptor.client_streaming:
                list(rpc(iter([request_type()]), timeout=10))
            elif descriptor.server_streaming:
                list(rpc(request_type(), timeout=10))
            else:
                rpc(request_type(), timeout=10)
        except grpc.RpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


def auth_failures(method: str, reason: str) -> float:
    labels = {"method": method, "reason": reason}
    return REGISTRY.get_sample_value("refit_auth_failures_total", labels) or 0.0


@pytest.mark.parametrize("method", [m.name for m in METHODS])
def test_no_token_is_unauthenticated(service: RefitServer, method: str) -> None:
    before = auth_failures(method, "missing")
    assert call(service, method, "") == grpc.StatusCode.UNAUTHENTICATED
    assert auth_failures(method, "missing") == before + 1


@pytest.mark.parametrize("method", [m.name for m in METHODS])
def test_unknown_token_is_unauthenticated(service: RefitServer, method: str) -> None:
    before = auth_failures(method, "invalid")
    assert call(service, method, ADMIN_TOKEN + "x") == grpc.StatusCode.UNAUTHENTICATED
    assert auth_failures(method, "invalid") == before + 1


@pytest.mark.parametrize("method", ADMIN_ONLY)
def test_predict_token_may_not_call_admin_rpcs(service: RefitServer, method: str) -> None:
    before = auth_failures(method, "forbidden")
    assert call(service, method, PREDICT_TOKEN) == grpc.StatusCode.PERMISSION_DENIED
    assert auth_failures(method, "forbidden") == before + 1


@pytest.mark.parametrize("method", sorted(PREDICT_RPCS))
def test_predict_token_reaches_predict_rpcs(service: RefitServer, method: str) -> None:
    code = call(service, method, PREDICT_TOKEN)
    assert code not in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)


@pytest.mark.parametrize("token", [ADMIN_TOKEN, SECOND_ADMIN_TOKEN])
@pytest.mark.parametrize("method", [m.name for m in METHODS])
def test_admin_tokens_reach_every_rpc(service: RefitServer, method: str, token: str) -> None:
    code = call(service, method, token)
    assert code not in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)


def test_the_roles_are_the_documented_ones() -> None:
    assert sorted(PREDICT_RPCS) == sorted(
        ["Predict", "PredictStream", "ListModels", "GetModel", "GetJob", "ListJobs", "WatchJob"]
    )
    assert sorted(["Retrain", "CancelJob", "SetDefaultVersion", "DeleteVersion"]) == ADMIN_ONLY


def test_messages_say_what_to_do(service: RefitServer) -> None:
    address = f"127.0.0.1:{service.port}"
    with connect(ClientSettings(address)) as channel, pytest.raises(grpc.RpcError) as caught:
        refit_pb2_grpc.RefitStub(channel).ListModels(pb.ListModelsRequest(), timeout=10)
    assert "authorization: Bearer" in caught.value.details()
    request = pb.DeleteVersionRequest(model="m", version="1")
    predictor = connect(ClientSettings(address, token=PREDICT_TOKEN))
    with predictor, pytest.raises(grpc.RpcError) as caught:
        refit_pb2_grpc.RefitStub(predictor).DeleteVersion(request, timeout=10)
    assert "predict token may not call DeleteVersion" in caught.value.details()


def test_health_and_reflection_need_no_token(service: RefitServer) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{service.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert health.status in (
            health_pb2.HealthCheckResponse.SERVING,
            health_pb2.HealthCheckResponse.NOT_SERVING,
        )
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        (answer,) = reflection.ServerReflectionInfo(iter([request]), timeout=10)
        assert "refit.v1.Refit" in {s.name for s in answer.list_services_response.service}


def test_tokens_are_never_logged(service: RefitServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = "wrong-token-that-must-not-appear-in-logs"
    for token in (ADMIN_TOKEN, PREDICT_TOKEN, wrong):
        for method in ("ListModels", "DeleteVersion", "Retrain"):
            call(service, method, token)
    assert caplog.records  # the access log saw the calls
    for token in (ADMIN_TOKEN, PREDICT_TOKEN, wrong):
        assert token not in caplog.text
    settings = repr(offline_settings(Path("/nowhere")))
    assert ADMIN_TOKEN not in settings and PREDICT_TOKEN not in settings


def test_every_token_is_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    import service.auth

    compared = []
    original = service.auth.hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        compared.append((len(a), len(b)))
        return original(a, b)

    monkeypatch.setattr(service.auth.hmac, "compare_digest", counting)
    auth = Authenticator(AuthSettings(("a" * 16, "b" * 16), ("c" * 40,)))
    assert auth.role_of("a" * 16) == "admin"  # found first: still compares all three
    assert auth.role_of("c" * 40) == "predict"
    assert auth.role_of("short") is None
    assert len(compared) == 9 and set(compared) == {(32, 32)}  # digests: no length leak


# --- configuration --------------------------------------------------------------------------------


def test_no_tokens_no_service() -> None:
    with pytest.raises(TokenConfigError, match="REFIT_INSECURE_NO_AUTH"):
        ServiceSettings.from_env({})


def test_insecure_switch_opens_every_rpc(tmp_path: Path) -> None:
    settings = ServiceSettings.from_env({"REFIT_INSECURE_NO_AUTH": "true"})
    assert not settings.auth.enabled
    refit = start_service(offline_settings(tmp_path, auth=settings.auth), wait_ready=False)
    try:
        assert call(refit, "ListModels", "") == grpc.StatusCode.OK
        assert call(refit, "DeleteVersion", "") == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        refit.stop()


@pytest.mark.parametrize(
    ("env", "error"),
    [
        ({"REFIT_ADMIN_TOKEN": "short"}, "too weak"),
        ({"REFIT_ADMIN_TOKEN": "change-me-admin-token-please"}, "too weak"),
        ({"REFIT_ADMIN_TOKEN": "x" * 20, "REFIT_PREDICT_TOKEN": "x" * 20}, "both roles"),
    ],
)
def test_weak_or_shared_tokens_are_refused(env: dict, error: str) -> None:
    with pytest.raises(TokenConfigError, match=error):
        ServiceSettings.from_env(env)


def test_tokens_from_env_with_rotation() -> None:
    env = {"REFIT_ADMIN_TOKEN": f"{'a' * 16}, {'b' * 16}", "REFIT_PREDICT_TOKEN": "c" * 16}
    auth = ServiceSettings.from_env(env).auth
    assert auth.admin_tokens == ("a" * 16, "b" * 16) and auth.predict_tokens == ("c" * 16,)


def test_tokens_file_is_private_and_read(tmp_path: Path) -> None:
    path = tmp_path / "data" / "tokens.env"
    assert create_tokens_file(path)
    assert not create_tokens_file(path)  # kept: tokens survive `make down && make up`
    assert os.stat(path).st_mode & 0o777 == 0o600
    tokens = read_tokens_file(path)
    assert len(tokens["REFIT_ADMIN_TOKEN"]) >= 32 and len(tokens["REFIT_PREDICT_TOKEN"]) >= 32
    auth = ServiceSettings.from_env({"REFIT_TOKENS_FILE": str(path)}).auth
    assert auth.admin_tokens == (tokens["REFIT_ADMIN_TOKEN"],)
    path.chmod(0o644)
    with pytest.raises(TokenConfigError, match="chmod 600"):
        ServiceSettings.from_env({"REFIT_TOKENS_FILE": str(path)})
