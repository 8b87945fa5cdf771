"""MinIO's identities and admin API as the S3 stand-in serves them
(deploy/containers/test/s3_standin.py): users named by access key, canned policies kept as each
user's inline moto IAM policies, and the four admin calls minio_init.py makes, root only."""

from __future__ import annotations

import io
import json
import threading
from typing import Any

from deploy.containers.test.sigv4 import Refused


class Identities:
    """Users (named by access key) with secrets, canned policies, and which user has which.
    moto checks each request against the user's inline IAM policies, which mirror this."""

    def __init__(self, iam) -> None:
        self._iam = iam
        self._keys: dict[str, Any] = {}  # access key -> moto's AccessKey (holds the secret)
        self._policies: dict[str, str] = {}  # name -> document (JSON)
        self._attached: dict[str, list[str]] = {}
        self._lock = threading.Lock()

    def secret(self, access_key: str) -> str | None:
        key = self._keys.get(access_key)
        return None if key is None else key.secret_access_key

    def add_policy(self, name: str, document: str) -> None:
        """Adds or replaces a policy; users that have it get the new document at once."""
        from moto.iam.exceptions import MalformedPolicyDocument
        from moto.iam.policy_validation import IAMPolicyDocumentValidator

        try:  # refused here, as by MinIO, rather than when a user gets it
            IAMPolicyDocumentValidator(document).validate()
        except (MalformedPolicyDocument, ValueError) as exc:
            raise Refused("MalformedPolicy", f"policy {name}: {exc}", 400) from exc
        with self._lock:
            self._policies[name] = document
            for user, names in self._attached.items():
                if name in names:
                    self._iam.put_user_policy(user, name, document)

    def add_user(self, access_key: str, secret_key: str) -> None:
        """A new user, or a new secret for one that exists (its policies stay)."""
        with self._lock:
            if access_key not in self._keys:
                self._iam.create_user(region_name="us-east-1", user_name=access_key, path="/")
                self._keys[access_key] = self._iam.create_access_key(access_key)
                self._keys[access_key].access_key_id = access_key  # MinIO: the name is the key
                self._attached[access_key] = []
            self._keys[access_key].secret_access_key = secret_key

    def attach(self, user: str, names: list[str]) -> None:
        with self._lock:
            if user not in self._attached:
                raise Refused(
                    "XMinioAdminNoSuchUser", f"The specified user {user} does not exist.", 404
                )
            if missing := [n for n in names if n not in self._policies]:
                raise Refused("XMinioAdminNoSuchPolicy", f"no policy {', '.join(missing)}", 404)
            new = [n for n in names if n not in self._attached[user]]
            if not new:
                raise Refused(
                    "XMinioAdminPolicyChangeAlreadyApplied",
                    "The specified policy change is already in effect.",
                    400,
                )
            for name in new:
                self._iam.put_user_policy(user, name, self._policies[name])
            self._attached[user] += new

    def policy_names(self, user: str) -> list[str]:
        with self._lock:
            if user not in self._attached:
                raise Refused(
                    "XMinioAdminNoSuchUser", f"The specified user {user} does not exist.", 404
                )
            return list(self._attached[user])


class Admin:
    """MinIO's admin API, the four calls minio_init.py makes; only the root identity may call."""

    def __init__(self, identities: Identities, root_user: str, root_password: str) -> None:
        self.identities = identities
        self.root_user, self.root_password = root_user, root_password

    def __call__(
        self, method: str, command: str, query: dict[str, str], body: bytes
    ) -> tuple[int, bytes]:
        """The answer's status and body; raises Refused for an error."""
        try:
            return self._answer(method, command, query, body)
        except (KeyError, ValueError, OSError) as exc:  # a missing field, bad JSON, bad cipher
            raise Refused(
                "XMinioAdminInvalidArgument", f"malformed {command}: {exc!r}", 400
            ) from exc

    def _answer(
        self, method: str, command: str, query: dict[str, str], body: bytes
    ) -> tuple[int, bytes]:
        if (method, command) == ("PUT", "add-canned-policy"):
            self.identities.add_policy(query["name"], body.decode())
            return 200, b""
        if (method, command) == ("PUT", "add-user"):
            user = json.loads(self._decrypt(body))
            self.identities.add_user(query["accessKey"], user["secretKey"])
            return 200, b""
        if (method, command) == ("GET", "user-info"):
            names = self.identities.policy_names(query["accessKey"])
            return 200, json.dumps({"policyName": ",".join(names), "status": "enabled"}).encode()
        if (method, command) == ("POST", "idp/builtin/policy/attach"):
            request = json.loads(self._decrypt(body))
            self.identities.attach(request["user"], request["policies"])
            return 204, b""  # no body: minio-py takes that as done (MinIO's older answer)
        raise Refused("NotImplemented", f"the S3 stand-in does not serve {method} {command}", 501)

    def _decrypt(self, body: bytes) -> bytes:
        """MinIO encrypts these bodies with the root password (minio.crypto's format)."""
        from minio.crypto import decrypt

        class Response(io.BytesIO):  # what minio.crypto reads from: a urllib3 response
            def release_conn(self) -> None:
                pass

        return decrypt(Response(body), self.root_password)
