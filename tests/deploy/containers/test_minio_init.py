"""deploy/containers/minio_init.py's pieces: valid policy documents, the admin calls in order
(against a recording stand-in for MinioAdmin: pure call sequencing), buckets made once. The
policies themselves are enforced, and run against, in test_policies.py."""

from __future__ import annotations

import json

from deploy.containers import minio_init

BUCKET = "refit"
SECRETS = {
    "MINIO_SERVICE_SECRET_KEY": "s" * 16,
    "MINIO_TRAINER_SECRET_KEY": "t" * 16,
    "MINIO_TORCHSERVE_SECRET_KEY": "k" * 16,
}
SERVICE = minio_init.service_policy(BUCKET)
TRAINER = minio_init.trainer_policy(BUCKET)


def test_policies_are_valid_iam_json():
    for policy in (SERVICE, TRAINER):
        assert json.loads(json.dumps(policy))["Version"] == "2012-10-17"
        for statement in policy["Statement"]:
            assert set(statement) == {"Effect", "Action", "Resource"}
            assert all(r.startswith("arn:aws:s3:::") for r in statement["Resource"])


def test_the_trainer_reads_the_buckets_it_is_given():
    policy = json.dumps(minio_init.trainer_policy(BUCKET, datasets="data-x", models="models-y"))
    assert "arn:aws:s3:::data-x/*" in policy and "arn:aws:s3:::models-y/*" in policy
    assert "arn:aws:s3:::datasets" not in policy


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
    keeper = ("user_add", "refit-torchserve", SECRETS["MINIO_TORCHSERVE_SECRET_KEY"])
    assert keeper in admin.calls


def test_a_second_run_does_not_attach_again():
    names = ("refit-service", "refit-trainer", "refit-torchserve")
    admin = RecordingAdmin({name: name for name in names})
    minio_init.create_identities(admin, minio_init.identities(BUCKET, SECRETS))
    assert not [c for c in admin.calls if c[0] == "attach_policy"]


def test_buckets_are_created_once(s3_store):
    minio_init.create_buckets(s3_store.client, ["refit-init-a", "refit-init-b"])
    minio_init.create_buckets(s3_store.client, ["refit-init-a"])
    names = {b.name for b in s3_store.client.list_buckets()}
    assert {"refit-init-a", "refit-init-b"} <= names
