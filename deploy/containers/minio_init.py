"""One-shot object-store set-up for the compose stack (the `minio-init` container).

Creates the buckets and one least-privilege MinIO identity per component, each with a policy
that allows what that component's code does and nothing else:

- ``refit-service`` lists the refit bucket and reads the registry and the archives (it presigns
  the archive URLs TorchServe fetches, so the signer must be able to read them). It writes only
  the models' default pointers (promote, rollback) and deletes only version records
  (DeleteVersion). No datasets, checkpoints, jobs or weights; no archive writes.
- ``refit-trainer`` lists and reads the datasets and models buckets (datasets, backbone weights),
  and reads and writes archives, weights, checkpoints, job records and the registry in the refit
  bucket (it publishes versions). It deletes a job's checkpoint once its version is published, a
  version record whose publish failed, and what garbage collection (``refit gc``, run with its
  identity) removes: archives, weights and checkpoints. It deletes no job records, and writes
  nothing outside those prefixes.
- ``refit-torchserve`` (each TorchServe replica's key keeper, deploy/torchserve/keeper.py) writes
  the replicas' keys under ``torchserve/keys/`` and does nothing else; the service and the
  trainer may read them there (refit/torchserve/keys.py), no one else.

Only this container gets the root credentials. It is idempotent, so it runs on every `up`:
buckets that exist are kept, users get the secret from the environment, policies are replaced.
The container test's S3 stand-in (deploy/containers/test/s3_standin.py) serves the same admin
calls and enforces these policies, and the tests run every component under them.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

DATASETS_BUCKET = "datasets"  # refit dataset upload s3://datasets/NAME; the trainer reads it
MODELS_BUCKET = "models"  # torchvision backbone weights, s3://models/backbones/NAME.pth
# The trainer's prefixes in the refit bucket (refit/registry.py, trainer/checkpoint.py, jobs).
TRAINER_PREFIXES = ("archives", "registry", "weights", "checkpoints", "jobs")
WRITE = ["s3:PutObject", "s3:AbortMultipartUpload"]  # archives and checkpoints go up in parts
VERSION_RECORDS = "registry/*/versions/*"  # refit/registry.py's layout
DEFAULT_POINTERS = "registry/*/default.json"
TORCHSERVE_KEYS = "torchserve/keys"  # refit/torchserve/keys.py, deploy/torchserve/keeper.py


@dataclass(frozen=True)
class Identity:
    access_key: str
    secret_key: str
    policy: dict

    @property
    def policy_name(self) -> str:
        return self.access_key


def statement(actions: list[str], resources: Iterable[str]) -> dict:
    return {"Effect": "Allow", "Action": actions, "Resource": sorted(resources)}


def bucket_arn(bucket: str) -> str:
    return f"arn:aws:s3:::{bucket}"


def objects(bucket: str, *prefixes: str) -> list[str]:
    return [f"arn:aws:s3:::{bucket}/{p}/*" for p in prefixes] or [f"arn:aws:s3:::{bucket}/*"]


def keys(bucket: str, *patterns: str) -> list[str]:
    return [f"arn:aws:s3:::{bucket}/{p}" for p in patterns]


def policy(*statements: dict) -> dict:
    return {"Version": "2012-10-17", "Statement": list(statements)}


def service_policy(bucket: str) -> dict:
    return policy(
        statement(["s3:ListBucket"], [bucket_arn(bucket)]),
        statement(["s3:GetObject"], objects(bucket, "registry", "archives", TORCHSERVE_KEYS)),
        statement(["s3:PutObject"], keys(bucket, DEFAULT_POINTERS)),
        statement(["s3:DeleteObject"], keys(bucket, VERSION_RECORDS)),
    )


def trainer_policy(
    bucket: str, *, datasets: str = DATASETS_BUCKET, models: str = MODELS_BUCKET
) -> dict:
    """``datasets`` and ``models``: the buckets it only reads (tests name their own)."""
    read_only = (datasets, models)
    return policy(
        statement(["s3:ListBucket"], [bucket_arn(b) for b in (bucket, *read_only)]),
        statement(
            ["s3:GetObject"],
            objects(bucket, *TRAINER_PREFIXES, TORCHSERVE_KEYS)
            + [o for b in read_only for o in objects(b)],
        ),
        statement(WRITE, objects(bucket, *TRAINER_PREFIXES)),
        statement(
            ["s3:DeleteObject"],
            objects(bucket, "archives", "weights", "checkpoints") + keys(bucket, VERSION_RECORDS),
        ),
    )


def torchserve_policy(bucket: str) -> dict:
    return policy(statement(["s3:PutObject"], objects(bucket, TORCHSERVE_KEYS)))


# Each component's policy by its role; the tests create identities from these too.
POLICIES = {"service": service_policy, "trainer": trainer_policy, "torchserve": torchserve_policy}


def identities(bucket: str, env: Mapping[str, str]) -> list[Identity]:
    return [
        Identity("refit-service", env["MINIO_SERVICE_SECRET_KEY"], service_policy(bucket)),
        Identity("refit-trainer", env["MINIO_TRAINER_SECRET_KEY"], trainer_policy(bucket)),
        Identity("refit-torchserve", env["MINIO_TORCHSERVE_SECRET_KEY"], torchserve_policy(bucket)),
    ]


def create_buckets(client, names: Iterable[str]) -> None:
    for name in names:
        if not client.bucket_exists(name):
            client.make_bucket(name)
        print(f"bucket {name}: ready")


def create_identities(admin, wanted: Iterable[Identity]) -> None:
    """Users with their secrets and policies; a policy already attached is left attached."""
    for identity in wanted:
        admin.policy_add(identity.policy_name, policy=identity.policy)
        admin.user_add(identity.access_key, identity.secret_key)
        attached = json.loads(admin.user_info(identity.access_key)).get("policyName") or ""
        if identity.policy_name not in attached.split(","):
            admin.attach_policy([identity.policy_name], user=identity.access_key)
        print(f"user {identity.access_key}: policy {identity.policy_name}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.parse_args(argv)  # no options; --help says what this is

    from minio import Minio
    from minio.credentials import StaticProvider
    from minio.minioadmin import MinioAdmin

    env = os.environ
    endpoint = env["MINIO_ENDPOINT"]
    host, secure = endpoint.split("://", 1)[-1], endpoint.startswith("https://")
    user, password = env["MINIO_ROOT_USER"], env["MINIO_ROOT_PASSWORD"]
    bucket = env.get("REFIT_BUCKET", "refit")

    client = Minio(host, access_key=user, secret_key=password, secure=secure)
    create_buckets(client, [bucket, DATASETS_BUCKET, MODELS_BUCKET])
    admin = MinioAdmin(endpoint=host, credentials=StaticProvider(user, password), secure=secure)
    create_identities(admin, identities(bucket, env))


if __name__ == "__main__":
    main()
