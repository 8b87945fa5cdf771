"""deploy/containers/minio_init.py: each component's MinIO policy allows what its code does and
nothing more, and the set-up is idempotent. The policies cannot be enforced by the S3 stand-in
the container test runs (it has no authentication), so their content is checked here; the
admin calls are checked against a recording stand-in for MinioAdmin (pure call sequencing)."""

from __future__ import annotations

import json
from fnmatch import fnmatch

import pytest

from deploy.containers import minio_init

BUCKET = "refit"
SECRETS = {"MINIO_SERVICE_SECRET_KEY": "s" * 16, "MINIO_TRAINER_SECRET_KEY": "t" * 16}


def allows(policy: dict, action: str, resource: str) -> bool:
    return any(
        s["Effect"] == "Allow"
        and action in s["Action"]
        and any(fnmatch(resource, r) for r in s["Resource"])
        for s in policy["Statement"]
    )


def obj(key: str, bucket: str = BUCKET) -> str:
    return f"arn:aws:s3:::{bucket}/{key}"


SERVICE = minio_init.service_policy(BUCKET)
TRAINER = minio_init.trainer_policy(BUCKET)


@pytest.mark.parametrize(
    ("action", "resource"),
    [
        ("s3:ListBucket", "arn:aws:s3:::refit"),  # ensure_bucket, registry listing
        ("s3:GetObject", obj("registry/flowers/versions/3.json")),
        ("s3:GetObject", obj("archives/flowers/abc.mar")),  # presigned for TorchServe
        ("s3:PutObject", obj("registry/flowers/default.json")),  # promote, rollback
        ("s3:DeleteObject", obj("registry/flowers/versions/2.json")),  # DeleteVersion
    ],
)
def test_service_may_do_what_its_code_does(action, resource):
    assert allows(SERVICE, action, resource)


@pytest.mark.parametrize(
    ("action", "resource"),
    [
        ("s3:PutObject", obj("archives/flowers/abc.mar")),
        ("s3:DeleteObject", obj("archives/flowers/abc.mar")),
        ("s3:GetObject", obj("checkpoints/run/last.pt")),
        ("s3:GetObject", obj("jobs/1.json")),
        ("s3:GetObject", obj("flowers/rose/1.jpg", "datasets")),
        ("s3:ListBucket", "arn:aws:s3:::datasets"),
        ("s3:CreateBucket", "arn:aws:s3:::refit"),
        ("s3:DeleteBucket", "arn:aws:s3:::refit"),
        ("s3:PutBucketPolicy", "arn:aws:s3:::refit"),
    ],
)
def test_service_may_do_nothing_else(action, resource):
    assert not allows(SERVICE, action, resource)


@pytest.mark.parametrize(
    ("action", "resource"),
    [
        ("s3:ListBucket", "arn:aws:s3:::datasets"),
        ("s3:GetObject", obj("flowers/rose/1.jpg", "datasets")),
        ("s3:GetObject", obj("backbones/resnet18.pth", "models")),
        ("s3:PutObject", obj("archives/flowers/abc.mar")),
        ("s3:AbortMultipartUpload", obj("archives/flowers/abc.mar")),
        ("s3:PutObject", obj("checkpoints/run/last.pt")),
        ("s3:PutObject", obj("jobs/1.json")),
        ("s3:PutObject", obj("weights/flowers/abc.pt")),
        ("s3:PutObject", obj("registry/flowers/versions/3.json")),  # publishes versions
        ("s3:GetObject", obj("registry/flowers/default.json")),  # the promotion gate
    ],
)
def test_trainer_may_do_what_its_code_does(action, resource):
    assert allows(TRAINER, action, resource)


@pytest.mark.parametrize(
    ("action", "resource"),
    [
        ("s3:PutObject", obj("flowers/rose/1.jpg", "datasets")),  # datasets are read-only
        ("s3:DeleteObject", obj("flowers/rose/1.jpg", "datasets")),
        ("s3:PutObject", obj("backbones/resnet18.pth", "models")),
        ("s3:DeleteObject", obj("registry/flowers/versions/3.json")),
        ("s3:DeleteObject", obj("archives/flowers/abc.mar")),
        ("s3:PutObject", obj("elsewhere/file")),
        ("s3:GetObject", obj("anything", "other-bucket")),
        ("s3:CreateBucket", "arn:aws:s3:::refit"),
    ],
)
def test_trainer_may_do_nothing_else(action, resource):
    assert not allows(TRAINER, action, resource)


def test_policies_are_valid_iam_json():
    for policy in (SERVICE, TRAINER):
        assert json.loads(json.dumps(policy))["Version"] == "2012-10-17"
        for statement in policy["Statement"]:
            assert set(statement) == {"Effect", "Action", "Resource"}
            assert all(r.startswith("arn:aws:s3:::") for r in statement["Resource"])


class RecordingAdmin:
    """Records MinioAdmin calls; user_info answers with the policies attached so far."""

    def __init__(self, attached: dict[str, str] | None = None) -> None:
        self.calls: list[tuple] = []
        self.attached = dict(attached or {})

    def policy_add(self, name, policy=None):
        self.calls.append(("policy_add", name, policy))

    def user_add(self, access_key, secret_key):
        self.calls.append(("user_add", access_key, secret_key))

    def user_info(self, access_key):
        return json.dumps({"status": "enabled", "policyName": self.attached.get(access_key, "")})

    def attach_policy(self, policies, user=None):
        self.calls.append(("attach_policy", tuple(policies), user))
        self.attached[user] = ",".join(policies)


def test_identities_get_their_secret_and_policy():
    admin = RecordingAdmin()
    minio_init.create_identities(admin, minio_init.identities(BUCKET, SECRETS))
    assert ("user_add", "refit-service", SECRETS["MINIO_SERVICE_SECRET_KEY"]) in admin.calls
    assert ("user_add", "refit-trainer", SECRETS["MINIO_TRAINER_SECRET_KEY"]) in admin.calls
    assert ("policy_add", "refit-service", SERVICE) in admin.calls
    assert ("policy_add", "refit-trainer", TRAINER) in admin.calls
    assert ("attach_policy", ("refit-service",), "refit-service") in admin.calls
    assert ("attach_policy", ("refit-trainer",), "refit-trainer") in admin.calls


def test_a_second_run_does_not_attach_again():
    admin = RecordingAdmin({"refit-service": "refit-service", "refit-trainer": "refit-trainer"})
    minio_init.create_identities(admin, minio_init.identities(BUCKET, SECRETS))
    assert not [c for c in admin.calls if c[0] == "attach_policy"]


def test_buckets_are_created_once(s3_store):
    minio_init.create_buckets(s3_store.client, ["refit-init-a", "refit-init-b"])
    minio_init.create_buckets(s3_store.client, ["refit-init-a"])
    names = {b.name for b in s3_store.client.list_buckets()}
    assert {"refit-init-a", "refit-init-b"} <= names
