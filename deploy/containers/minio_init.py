"""One-shot object-store set-up for the compose stack (the `minio-init` container).

Creates the buckets and one least-privilege MinIO identity per component, each with a policy
that allows what that component's code does and nothing else:

- ``refit-service`` reads the registry and the archives (it presigns archive URLs that TorchServe
  fetches, so the signer must be able to read them) and writes the registry, because the public
  API promotes, rolls back and deletes versions. No datasets, checkpoints or jobs.
- ``refit-trainer`` reads datasets and backbone weights, and reads and writes archives, weights,
  checkpoints, job records and the registry (it publishes versions). It deletes nothing.

Only this container gets the root credentials. It is idempotent, so it runs on every `up`:
buckets that exist are kept, users get the secret from the environment, policies are replaced.
``--buckets-only`` skips the identities, for an S3 server without MinIO's admin API (the
container test's stand-in); the components then use whatever credentials that server accepts.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass

DATASETS_BUCKET = "datasets"  # refit dataset upload s3://datasets/NAME; the trainer reads it
MODELS_BUCKET = "models"  # torchvision backbone weights, s3://models/backbones/NAME.pth
# The trainer's prefixes in the refit bucket (refit/registry.py, trainer/checkpoint.py, jobs).
TRAINER_PREFIXES = ("archives", "registry", "weights", "checkpoints", "jobs")
WRITE = ["s3:PutObject", "s3:AbortMultipartUpload"]  # archives go up in parts


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


def policy(*statements: dict) -> dict:
    return {"Version": "2012-10-17", "Statement": list(statements)}


def service_policy(bucket: str) -> dict:
    return policy(
        statement(["s3:ListBucket"], [bucket_arn(bucket)]),
        statement(["s3:GetObject"], objects(bucket, "registry", "archives")),
        statement([*WRITE, "s3:DeleteObject"], objects(bucket, "registry")),
    )


def trainer_policy(bucket: str) -> dict:
    read_only = (DATASETS_BUCKET, MODELS_BUCKET)
    return policy(
        statement(["s3:ListBucket"], [bucket_arn(b) for b in (bucket, *read_only)]),
        statement(
            ["s3:GetObject"],
            objects(bucket, *TRAINER_PREFIXES) + [o for b in read_only for o in objects(b)],
        ),
        statement(WRITE, objects(bucket, *TRAINER_PREFIXES)),
    )


def identities(bucket: str, env: dict[str, str]) -> list[Identity]:
    return [
        Identity("refit-service", env["MINIO_SERVICE_SECRET_KEY"], service_policy(bucket)),
        Identity("refit-trainer", env["MINIO_TRAINER_SECRET_KEY"], trainer_policy(bucket)),
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
    parser.add_argument("--buckets-only", action="store_true", help="no users or policies")
    args = parser.parse_args(argv)

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
    if args.buckets_only:
        print("identities skipped (--buckets-only)")
        return
    admin = MinioAdmin(endpoint=host, credentials=StaticProvider(user, password), secure=secure)
    create_identities(admin, identities(bucket, env))


if __name__ == "__main__":
    main()
