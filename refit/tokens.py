"""API tokens: where they come from, the file the local stack keeps them in, and which one the
`refit` CLI sends.

Two roles: ``predict`` (Predict, PredictStream, ListModels, GetModel, GetJob, ListJobs, WatchJob)
and ``admin`` (every RPC). The service reads ``REFIT_ADMIN_TOKEN`` and ``REFIT_PREDICT_TOKEN``
(comma-separated, for rotation) and, when ``REFIT_TOKENS_FILE`` is set, the same two lines from
that file. ``make up`` creates the file as ``$REFIT_DATA_DIR/tokens.env`` (mode 0600); the CLI
sends ``REFIT_TOKEN``, else the admin token of that file. No token is ever logged.
"""

from __future__ import annotations

import os
import secrets
import stat
from collections.abc import Mapping
from pathlib import Path

from refit.settings import declaration, declare
from refit.storage import StorageSettings

ADMIN = "admin"
PREDICT = "predict"
ADMIN_TOKEN = declare(
    "REFIT_ADMIN_TOKEN",
    "",
    "admin tokens (every RPC), comma-separated for rotation; 16 or more random characters",
    secret=True,
)
PREDICT_TOKEN = declare(
    "REFIT_PREDICT_TOKEN",
    "",
    "predict tokens (Predict, PredictStream and the read RPCs), comma-separated",
    secret=True,
)
TOKENS_FILE = declare(
    "REFIT_TOKENS_FILE",
    None,
    "a file (mode 0600) of REFIT_ADMIN_TOKEN= and REFIT_PREDICT_TOKEN= lines, read as well",
    parse=Path,
)
CLIENT_TOKEN = declare(
    "REFIT_TOKEN",
    "",
    "the token the CLI sends; unset: the admin token of REFIT_TOKENS_FILE, else of "
    "$REFIT_DATA_DIR/tokens.env",
    secret=True,
)
ENV_NAMES = {ADMIN: ADMIN_TOKEN.name, PREDICT: PREDICT_TOKEN.name}
TOKENS_FILE_NAME = "tokens.env"
MIN_TOKEN_LENGTH = 16
PLACEHOLDER = "change-me"  # .env.example's values: never accepted as a token


class TokenConfigError(ValueError):
    """Tokens that are missing, weak or kept in a file others can read."""


def tokens_file(data_dir: Path) -> Path:
    return Path(data_dir) / TOKENS_FILE_NAME


def create_tokens_file(path: Path) -> bool:
    """Writes random admin and predict tokens to ``path`` (mode 0600) unless it exists.
    Returns whether it created the file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return False
    lines = ["# refit API tokens, created by `make up`. Keep private (mode 0600)."]
    lines += [f"{name}={secrets.token_urlsafe(32)}" for name in ENV_NAMES.values()]
    with os.fdopen(fd, "w") as out:
        out.write("\n".join(lines) + "\n")
    return True


def read_tokens_file(path: Path) -> dict[str, str]:
    """``NAME=VALUE`` lines (``#`` comments); refuses a file that group or others can read."""
    try:
        mode = path.stat().st_mode
        text = path.read_text()
    except OSError as exc:
        raise TokenConfigError(f"cannot read the tokens file {path}: {exc.strerror}") from exc
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise TokenConfigError(
            f"the tokens file {path} is readable by others (mode {stat.S_IMODE(mode):04o}); "
            f"run: chmod 600 {path}"
        )
    values = {}
    for line in text.splitlines():
        name, sep, value = line.strip().partition("=")
        if sep and not name.startswith("#"):
            values[name.strip()] = value.strip()
    return values


def role_tokens(env: Mapping[str, str]) -> dict[str, list[str]]:
    """Each role's tokens from the environment and ``REFIT_TOKENS_FILE``; checked."""
    sources = [env]
    if (path := TOKENS_FILE.value(env)) is not None:
        sources.append(read_tokens_file(path))
    roles = {
        role: [t.strip() for s in sources for t in s.get(name, "").split(",") if t.strip()]
        for role, name in ENV_NAMES.items()
    }
    _check(roles)
    return roles


def _check(roles: dict[str, list[str]]) -> None:
    for role, tokens in roles.items():
        for token in tokens:
            if len(token) < MIN_TOKEN_LENGTH or PLACEHOLDER in token:
                raise TokenConfigError(
                    f"a {ENV_NAMES[role]} token is too weak: use at least {MIN_TOKEN_LENGTH} "
                    "random characters, e.g. `python -c 'import secrets; "
                    "print(secrets.token_urlsafe(32))'`"
                )
    if set(roles[ADMIN]) & set(roles[PREDICT]):
        raise TokenConfigError("the same token is given both roles; give each role its own")


def client_token(env: Mapping[str, str] | None = None) -> str:
    """The token the CLI sends: REFIT_TOKEN, else the admin token of REFIT_TOKENS_FILE, else of
    the local stack's file ($REFIT_DATA_DIR/tokens.env). Empty when none is found."""
    env = os.environ if env is None else env
    if token := CLIENT_TOKEN.value(env):
        return token
    data_dir = declaration(StorageSettings, "data_dir").value(env)
    path = TOKENS_FILE.value(env) or tokens_file(data_dir)
    if not path.is_file():
        return ""
    admin = read_tokens_file(path).get(ENV_NAMES[ADMIN], "")
    return admin.split(",")[0].strip()
