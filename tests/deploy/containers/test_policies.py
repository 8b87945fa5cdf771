"""The shipped least-privilege policies, enforced: deploy/containers/minio_init.py's ``main()``
sets up the policed S3 stand-in (deploy/containers/test/s3_standin.py) exactly as the compose
stack's minio-init job sets up MinIO (buckets ``refit``, ``datasets``, ``models``; users
``refit-service`` and ``refit-trainer`` through MinIO's admin API). Then, for each identity,
every operation its component's code performs succeeds, through refit's own storage code, and
a sample of operations outside its role is refused. Credentials and presigned URLs too.

The end-to-end check (a retrain, cancel, delete, rollback and ``refit gc`` with the service and
the trainer under these identities) is tests/service/test_retrain.py."""

from __future__ import annotations

import json
import secrets
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from minio.error import MinioAdminException

from deploy.containers import minio_init
from refit.gc import collect_garbage
from refit.publish import version_key
from refit.registry import Registry, VersionRecord
from refit.storage import AccessDenied, S3Store
from tests.conftest import MotoServer

pytestmark = pytest.mark.integration

BUCKET = "refit"
SECRETS = {
    "MINIO_SERVICE_SECRET_KEY": secrets.token_urlsafe(16),
    "MINIO_TRAINER_SECRET_KEY": secrets.token_urlsafe(16),
    "MINIO_TORCHSERVE_SECRET_KEY": secrets.token_urlsafe(16),
}
ENDED_JOB = "job-20260101T000000-0000abcd"  # SUCCEEDED: garbage collection may take its checkpoint
ARCHIVE = Registry.archive_key("m", "a" * 64)  # v1's, the default
ARCHIVE_2 = Registry.archive_key("m", "2" * 64)  # v2's
DATASET_IMAGE = ("datasets", "colours/red/0.png")
BACKBONE = ("models", "backbones/resnet18.pth")
CHECKPOINT = f"checkpoints/{ENDED_JOB}/last.pt"  # trainer/checkpoint.py's layout
JOB_RECORD = f"jobs/{ENDED_JOB}.json"  # trainer/jobs/records.py's
TORCHSERVE_KEYS = "torchserve/keys/10.0.0.7.json"  # a replica's, as its keeper publishes them


@pytest.fixture(scope="module")
def minio() -> Iterator[MotoServer]:
    """A stand-in of this module's own, set up by minio_init twice (every `up` runs it), then
    holding what a stack that has run a while holds."""
    server = MotoServer()
    server.start()
    env = {
        "MINIO_ENDPOINT": server.settings.endpoint,
        "MINIO_ROOT_USER": server.ROOT_USER,
        "MINIO_ROOT_PASSWORD": server.root_password,
        "REFIT_BUCKET": BUCKET,
        **SECRETS,
    }
    try:
        with pytest.MonkeyPatch.context() as patch:
            for name, value in env.items():
                patch.setenv(name, value)
            minio_init.main([])
            minio_init.main([])
        seed(S3Store(server.settings))
        yield server
    finally:
        server.stop()


def seed(root: S3Store) -> None:
    root.put(*DATASET_IMAGE, b"png")
    root.put(*BACKBONE, b"weights")
    root.ensure_bucket("elsewhere")
    root.put("elsewhere", "secret.txt", b"not refit's")
    registry = Registry(root, BUCKET)
    for version, archive in (("1", ARCHIVE), ("2", ARCHIVE_2)):
        root.put(BUCKET, archive, b"archive")
        registry.add(VersionRecord("m", version, archive, ["a"]))
    registry.set_default("m", "1")
    root.put(BUCKET, JOB_RECORD, job_record(ENDED_JOB))
    root.put(BUCKET, CHECKPOINT, b"checkpoint")
    root.put(BUCKET, TORCHSERVE_KEYS, b'{"management": "m", "inference": "i"}')


@pytest.fixture(scope="module")
def root(minio: MotoServer) -> S3Store:
    return S3Store(minio.settings)


def identity(minio: MotoServer, access_key: str, secret_key: str) -> S3Store:
    return S3Store(replace(minio.settings, access_key=access_key, secret_key=secret_key))


@pytest.fixture(scope="module")
def service(minio: MotoServer) -> S3Store:
    return identity(minio, "refit-service", SECRETS["MINIO_SERVICE_SECRET_KEY"])


@pytest.fixture(scope="module")
def trainer(minio: MotoServer) -> S3Store:
    return identity(minio, "refit-trainer", SECRETS["MINIO_TRAINER_SECRET_KEY"])


@pytest.fixture(scope="module")
def keeper(minio: MotoServer) -> S3Store:
    """TorchServe's key keeper (deploy/torchserve/keeper.py)."""
    return identity(minio, "refit-torchserve", SECRETS["MINIO_TORCHSERVE_SECRET_KEY"])


def fetch(url: str) -> tuple[int, bytes]:
    """A GET as TorchServe makes it from a presigned URL: (status, body)."""
    try:
        with urllib.request.urlopen(url, timeout=10) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def job_record(job_id: str) -> bytes:
    return json.dumps({"id": job_id, "model": "m", "state": "SUCCEEDED"}).encode()


def a_version(root: S3Store) -> str:
    """A fresh version record of ``m`` (for operations that delete one)."""
    version = str(secrets.randbelow(10**6) + 10)
    Registry(root, BUCKET).add(VersionRecord("m", version, ARCHIVE, ["a"]))
    return version


# --- the service ---------------------------------------------------------------------------------

Operation = Callable[[S3Store, S3Store], object]  # (the identity's store, root's store)


def service_reads_the_registry(store: S3Store, root: S3Store) -> None:
    registry = Registry(store, BUCKET)  # service/catalog.py's cache and watch
    assert registry.listing() and "m" in registry.models()
    assert registry.default_version("m") == "1"
    assert [v.version for v in registry.versions("m")][:2] == ["1", "2"]


def presigned_archive_is_served(store: S3Store, root: S3Store) -> None:
    # The reconciler and the publisher hand TorchServe this URL (service/catalog.py,
    # refit/publish.py); TorchServe fetches it with no credentials of its own.
    assert fetch(store.url(BUCKET, ARCHIVE)) == (200, b"archive")


def service_promotes_and_rolls_back(store: S3Store, root: S3Store) -> None:
    registry = Registry(store, BUCKET)
    registry.set_default("m", "2")
    registry.set_default("m", "1")
    assert Registry(root, BUCKET).default_version("m") == "1"


def service_deletes_a_version(store: S3Store, root: S3Store) -> None:
    version = a_version(root)
    store.delete(BUCKET, version_key("m", version))  # refit/publish.py delete_version
    assert root.stat(BUCKET, version_key("m", version)) is None


SERVICE_DOES: dict[str, Operation] = {
    "checks its bucket at start": lambda store, root: store.ensure_bucket(BUCKET),
    "reads TorchServe's keys": lambda store, root: store.get(BUCKET, TORCHSERVE_KEYS),
    "reads the registry": service_reads_the_registry,
    "presigns an archive URL for TorchServe": presigned_archive_is_served,
    "promotes and rolls back": service_promotes_and_rolls_back,
    "deletes a version": service_deletes_a_version,
}

SERVICE_MAY_NOT: dict[str, Operation] = {
    "read a dataset": lambda store, root: store.get(*DATASET_IMAGE),
    "list the datasets": lambda store, root: list(store.list("datasets")),
    "read a checkpoint": lambda store, root: store.get(BUCKET, CHECKPOINT),
    "read a job record": lambda store, root: store.get(BUCKET, JOB_RECORD),
    "write an archive": lambda store, root: store.put(BUCKET, "archives/m/b.mar", b"x"),
    "delete an archive": lambda store, root: store.delete(BUCKET, ARCHIVE),
    "write a version record": lambda store, root: store.put(BUCKET, version_key("m", "9"), b"{}"),
    "delete a default": lambda store, root: store.delete(BUCKET, "registry/m/default.json"),
    "write a checkpoint": lambda store, root: store.put(BUCKET, CHECKPOINT, b"x"),
    "delete a checkpoint": lambda store, root: store.delete(BUCKET, CHECKPOINT),
    "write a job record": lambda store, root: store.put(BUCKET, JOB_RECORD, b"{}"),
    "write TorchServe's keys": lambda store, root: store.put(BUCKET, TORCHSERVE_KEYS, b"{}"),
    "create a bucket": lambda store, root: store.ensure_bucket("another"),
}


@pytest.mark.parametrize("what", SERVICE_DOES)
def test_the_service_may_do_what_its_code_does(service, root, what) -> None:
    SERVICE_DOES[what](service, root)


@pytest.mark.parametrize("what", SERVICE_MAY_NOT)
def test_the_service_may_do_nothing_else(service, root, what) -> None:
    with pytest.raises(AccessDenied):
        SERVICE_MAY_NOT[what](service, root)


# --- the trainer ---------------------------------------------------------------------------------


def trainer_reads_a_dataset_and_a_backbone(store: S3Store, root: S3Store) -> None:
    assert [o.key for o in store.list("datasets", "colours/")] == [DATASET_IMAGE[1]]
    assert store.get(*DATASET_IMAGE) == b"png"
    assert store.stat(*BACKBONE) is not None and store.get(*BACKBONE) == b"weights"


def trainer_stores_and_presigns_an_archive(store: S3Store, root: S3Store, tmp: Path) -> None:
    archive = tmp / "big.mar"
    archive.write_bytes(secrets.token_bytes(6 * 2**20))  # over 5 MiB: it goes up in parts
    key = Registry.archive_key("m", "b" * 64)
    store.put_file(BUCKET, key, archive)  # trainer/artifacts.py
    assert fetch(store.url(BUCKET, key)) == (200, archive.read_bytes())  # refit/publish.py


def trainer_keeps_weights_checkpoints_and_jobs(store: S3Store, root: S3Store) -> None:
    for key in ("weights/m/cafe.pt", "checkpoints/job-x/last.pt", "jobs/job-x.json"):
        store.put(BUCKET, key, job_record("job-x"))
        assert store.stat(BUCKET, key) is not None and store.get(BUCKET, key) == job_record("job-x")
    assert "jobs/job-x.json" in {o.key for o in store.list(BUCKET, "jobs/")}
    store.delete(BUCKET, "checkpoints/job-x/last.pt")  # trainer/jobs/runner.py, once published
    assert root.stat(BUCKET, "checkpoints/job-x/last.pt") is None


def trainer_publishes_and_withdraws(store: S3Store, root: S3Store) -> None:
    registry = Registry(store, BUCKET)
    registry.add(VersionRecord("n", "1", Registry.archive_key("n", "c" * 64), ["a"]))
    registry.set_default("n", "1")  # the gate promoted it
    registry.add(VersionRecord("n", "2", Registry.archive_key("n", "d" * 64), ["a"]))
    store.delete(BUCKET, version_key("n", "2"))  # refit/publish.py: its publish failed
    assert [v.version for v in Registry(root, BUCKET).versions("n")] == ["1"]


def trainer_collects_garbage(store: S3Store, root: S3Store) -> None:
    dead = ["archives/m/dead.mar", "weights/m/dead.pt"]
    for key in dead:
        root.put(BUCKET, key, b"x")
    garbage = collect_garbage(store, BUCKET)  # `refit gc` and the trainer's periodic run
    assert {*dead, CHECKPOINT} <= set(garbage.all())
    assert all(root.stat(BUCKET, key) is None for key in [*dead, CHECKPOINT])
    assert root.stat(BUCKET, ARCHIVE) is not None  # v1's: still referenced


TRAINER_DOES: dict[str, Operation] = {
    "checks its bucket at start": lambda store, root: store.ensure_bucket(BUCKET),
    "reads TorchServe's keys": lambda store, root: store.get(BUCKET, TORCHSERVE_KEYS),
    "reads a dataset and a backbone": trainer_reads_a_dataset_and_a_backbone,
    "keeps weights, checkpoints and job records": trainer_keeps_weights_checkpoints_and_jobs,
    "publishes and withdraws versions": trainer_publishes_and_withdraws,
    "collects garbage": trainer_collects_garbage,
}

TRAINER_MAY_NOT: dict[str, Operation] = {
    "write outside its prefixes": lambda store, root: store.put(BUCKET, "elsewhere/x", b"x"),
    "write a dataset": lambda store, root: store.put("datasets", "colours/red/9.png", b"x"),
    "delete a dataset": lambda store, root: store.delete(*DATASET_IMAGE),
    "write backbone weights": lambda store, root: store.put(*BACKBONE, b"x"),
    "delete a job record": lambda store, root: store.delete(BUCKET, JOB_RECORD),
    "delete a default": lambda store, root: store.delete(BUCKET, "registry/m/default.json"),
    "read another bucket": lambda store, root: store.get("elsewhere", "secret.txt"),
    "list another bucket": lambda store, root: list(store.list("elsewhere")),
    "write another bucket": lambda store, root: store.put("elsewhere", "x", b"x"),
    "write TorchServe's keys": lambda store, root: store.put(BUCKET, TORCHSERVE_KEYS, b"{}"),
    "create a bucket": lambda store, root: store.ensure_bucket("another"),
}


@pytest.mark.parametrize("what", TRAINER_DOES)
def test_the_trainer_may_do_what_its_code_does(trainer, root, what) -> None:
    TRAINER_DOES[what](trainer, root)


def test_the_trainer_stores_and_presigns_archives(trainer, root, tmp_path: Path) -> None:
    trainer_stores_and_presigns_an_archive(trainer, root, tmp_path)


@pytest.mark.parametrize("what", TRAINER_MAY_NOT)
def test_the_trainer_may_do_nothing_else(trainer, root, what) -> None:
    with pytest.raises(AccessDenied):
        TRAINER_MAY_NOT[what](trainer, root)


# --- TorchServe's key keeper --------------------------------------------------------------------


def test_the_keeper_publishes_the_keys(keeper, root) -> None:
    keeper.put(BUCKET, TORCHSERVE_KEYS, b'{"management": "m2", "inference": "i2"}')
    assert root.get(BUCKET, TORCHSERVE_KEYS) == b'{"management": "m2", "inference": "i2"}'


KEEPER_MAY_NOT: dict[str, Operation] = {
    "read the keys back": lambda store, root: store.get(BUCKET, TORCHSERVE_KEYS),
    "list the bucket": lambda store, root: list(store.list(BUCKET, "torchserve/")),
    "read an archive": lambda store, root: store.get(BUCKET, ARCHIVE),
    "write an archive": lambda store, root: store.put(BUCKET, "archives/m/x.mar", b"x"),
    "write the registry": lambda store, root: store.put(BUCKET, "registry/m/default.json", b"{}"),
    "delete the keys": lambda store, root: store.delete(BUCKET, TORCHSERVE_KEYS),
    "read a dataset": lambda store, root: store.get(*DATASET_IMAGE),
}


@pytest.mark.parametrize("what", KEEPER_MAY_NOT)
def test_the_keeper_may_do_nothing_else(keeper, root, what) -> None:
    with pytest.raises(AccessDenied):
        KEEPER_MAY_NOT[what](keeper, root)


# --- credentials, presigned URLs, the admin API -----------------------------------------------


def test_a_refusal_names_the_identity_the_operation_and_the_object(service) -> None:
    with pytest.raises(AccessDenied) as caught:
        service.delete(BUCKET, ARCHIVE)
    assert caught.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert caught.value.message.startswith(
        f"the object store refused to let 'refit-service' delete s3://{BUCKET}/{ARCHIVE} "
        "(AccessDenied)"
    )


@pytest.mark.parametrize(
    ("access_key", "code"),
    [("refit-service", "SignatureDoesNotMatch"), ("nobody", "InvalidAccessKeyId")],
)
def test_wrong_credentials_are_refused(minio, access_key: str, code: str) -> None:
    with pytest.raises(AccessDenied) as caught:
        identity(minio, access_key, "wrong-secret").get(BUCKET, ARCHIVE)
    assert f"refused the credentials of {access_key!r} ({code})" in caught.value.message
    assert "MINIO_ACCESS_KEY and MINIO_SECRET_KEY" in caught.value.message


def test_anonymous_requests_are_refused(minio) -> None:
    endpoint = minio.settings.endpoint
    for url in (f"{endpoint}/{BUCKET}/{ARCHIVE}", f"{endpoint}/{BUCKET}", f"{endpoint}/"):
        status, body = fetch(url)
        assert status == 403 and b"<Code>AccessDenied</Code>" in body, url


def test_presigned_urls_carry_their_signers_policy(service) -> None:
    status, body = fetch(service.url(BUCKET, JOB_RECORD))
    assert status == 403 and b"<Code>AccessDenied</Code>" in body


def test_expired_and_tampered_presigned_urls_are_refused(service) -> None:
    issued = datetime.now(UTC) - timedelta(hours=1)
    expired = service.client.presigned_get_object(
        BUCKET, ARCHIVE, expires=timedelta(minutes=15), request_date=issued
    )
    status, body = fetch(expired)
    assert status == 403 and b"Request has expired" in body

    url = service.url(BUCKET, ARCHIVE)
    flipped = url[:-1] + ("0" if url[-1] != "0" else "1")
    other_key = url.replace(ARCHIVE, ARCHIVE_2)  # readable by the signer, but not signed
    for tampered in (flipped, other_key):
        status, body = fetch(tampered)
        assert status == 403 and b"<Code>SignatureDoesNotMatch</Code>" in body


def test_health_needs_no_credentials(minio) -> None:
    assert fetch(f"{minio.settings.endpoint}/minio/health/live")[0] == 200


def test_each_identity_has_exactly_its_policy(minio) -> None:
    admin = minio.admin()
    for name in ("refit-service", "refit-trainer", "refit-torchserve"):
        assert json.loads(admin.user_info(name))["policyName"] == name


def test_only_the_root_may_administer(minio) -> None:
    from minio.credentials import StaticProvider
    from minio.minioadmin import MinioAdmin

    credentials = StaticProvider("refit-trainer", SECRETS["MINIO_TRAINER_SECRET_KEY"])
    admin = MinioAdmin(endpoint=f"127.0.0.1:{minio.port}", credentials=credentials, secure=False)
    with pytest.raises(MinioAdminException) as caught:
        admin.attach_policy(["consoleAdmin"], user="refit-trainer")
    assert caught.value._code == "403"


def test_a_malformed_policy_is_refused_when_added(minio) -> None:
    bad = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": ["s3:GetObject"]}]}
    with pytest.raises(MinioAdminException) as caught:
        minio.admin().policy_add("no-resource", policy=bad)
    assert caught.value._code == "400" and "MalformedPolicy" in caught.value._body
