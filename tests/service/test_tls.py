"""TLS on the public port, with a CA generated here: server certificates, optional client
certificates, and the CLI trusting REFIT_TLS_CA_FILE."""

from __future__ import annotations

import datetime
import ipaddress
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cli import main as refit_cli
from cli.client import ClientSettings, connect
from refit.v1 import refit_pb2 as pb
from refit.v1 import refit_pb2_grpc
from service.config import ServiceSettings, TlsSettings
from service.server import RefitServer
from tests.service.conftest import ADMIN_TOKEN, offline_settings, start_service


@dataclass(frozen=True)
class Issued:
    cert: Path
    key: Path


class CertificateAuthority:
    """A throwaway CA that issues server and client certificates as PEM files."""

    def __init__(self, directory: Path, name: str) -> None:
        self.directory = directory
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self.cert = (
            _builder(subject, subject, self.key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.cert_file = directory / f"{name}.pem"
        self.cert_file.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, name: str, *, server: bool) -> Issued:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = _builder(subject, self.cert.subject, key.public_key()).add_extension(
            x509.ExtendedKeyUsage([usage]), critical=False
        )
        if server:
            names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        issued = Issued(self.directory / f"{name}.crt", self.directory / f"{name}.key")
        issued.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        issued.key.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        return issued


def _builder(subject: x509.Name, issuer: x509.Name, public_key) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict:
    directory = tmp_path_factory.mktemp("pki")
    ca, other = CertificateAuthority(directory, "ca"), CertificateAuthority(directory, "other-ca")
    return {
        "ca": ca,
        "other": other,
        "server": ca.issue("server", server=True),
        "client": ca.issue("client", server=False),
        "stranger": other.issue("stranger", server=False),
    }


def tls_service(data_dir: Path, tls: TlsSettings) -> RefitServer:
    return start_service(offline_settings(data_dir, tls=tls), wait_ready=False)


@pytest.fixture(scope="module")
def server_tls(pki: dict, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RefitServer]:
    tls = TlsSettings(pki["server"].cert, pki["server"].key)
    refit = tls_service(tmp_path_factory.mktemp("tls"), tls)
    yield refit
    refit.stop()


@pytest.fixture(scope="module")
def mutual_tls(pki: dict, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RefitServer]:
    tls = TlsSettings(pki["server"].cert, pki["server"].key, pki["ca"].cert_file)
    refit = tls_service(tmp_path_factory.mktemp("mtls"), tls)
    yield refit
    refit.stop()


def list_models(port: int, **client: object) -> grpc.StatusCode:
    settings = ClientSettings(f"127.0.0.1:{port}", token=ADMIN_TOKEN, **client)
    with connect(settings) as channel:
        try:
            refit_pb2_grpc.RefitStub(channel).ListModels(pb.ListModelsRequest(), timeout=5)
        except grpc.RpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


def test_tls_client_trusting_the_ca_is_served(server_tls: RefitServer, pki: dict) -> None:
    assert list_models(server_tls.port, ca_file=pki["ca"].cert_file) == grpc.StatusCode.OK


def test_plaintext_and_untrusted_clients_get_nothing(server_tls: RefitServer, pki: dict) -> None:
    assert list_models(server_tls.port) == grpc.StatusCode.UNAVAILABLE
    assert list_models(server_tls.port, ca_file=pki["other"].cert_file) == (
        grpc.StatusCode.UNAVAILABLE
    )


def test_tokens_still_apply_over_tls(server_tls: RefitServer, pki: dict) -> None:
    credentials = grpc.ssl_channel_credentials(pki["ca"].cert_file.read_bytes())
    with grpc.secure_channel(f"127.0.0.1:{server_tls.port}", credentials) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            refit_pb2_grpc.RefitStub(channel).ListModels(pb.ListModelsRequest(), timeout=5)
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert health.status in (health_pb2.HealthCheckResponse.SERVING,
                                 health_pb2.HealthCheckResponse.NOT_SERVING)  # fmt: skip


def test_client_certificates_when_a_client_ca_is_set(mutual_tls: RefitServer, pki: dict) -> None:
    ca = pki["ca"].cert_file
    client, stranger = pki["client"], pki["stranger"]
    assert list_models(mutual_tls.port, ca_file=ca) == grpc.StatusCode.UNAVAILABLE  # no cert
    assert (
        list_models(mutual_tls.port, ca_file=ca, cert_file=stranger.cert, key_file=stranger.key)
        == grpc.StatusCode.UNAVAILABLE
    )
    assert (
        list_models(mutual_tls.port, ca_file=ca, cert_file=client.cert, key_file=client.key)
        == grpc.StatusCode.OK
    )


def test_cli_uses_tls_and_the_token_from_the_environment(
    server_tls: RefitServer,
    pki: dict,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    monkeypatch.setenv("REFIT_TLS_CA_FILE", str(pki["ca"].cert_file))
    monkeypatch.setenv("REFIT_TOKEN", ADMIN_TOKEN)
    assert refit_cli(["models", "--address", f"127.0.0.1:{server_tls.port}", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []


def test_tls_settings_from_env(pki: dict) -> None:
    env = {
        "REFIT_ADMIN_TOKEN": ADMIN_TOKEN,
        "REFIT_TLS_CERT_FILE": str(pki["server"].cert),
        "REFIT_TLS_KEY_FILE": str(pki["server"].key),
    }
    assert ServiceSettings.from_env(env).tls.enabled
    assert not ServiceSettings.from_env({"REFIT_ADMIN_TOKEN": ADMIN_TOKEN}).tls.enabled
    with pytest.raises(ValueError, match="both"):
        ServiceSettings.from_env({**env, "REFIT_TLS_KEY_FILE": ""})
    with pytest.raises(ValueError, match="CLIENT_CA"):
        TlsSettings(client_ca_file=pki["ca"].cert_file)
