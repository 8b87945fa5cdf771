# One image, three roles picked by the command (see docker-compose.yml):
#   service    python -m service.server         (default)
#   torchserve torchserve --start --foreground ...
#   trainer    python -m trainer.base_model     (one-shot for now)
FROM python:3.11-slim-bookworm

# TorchServe 0.12's frontend is Java 17. The man dir is missing on slim images and the JRE's
# postinst writes a symlink into it. Not version-pinned: Debian security updates replace the
# package version, so a pin would break rebuilds; the base image tag fixes the release.
# hadolint ignore=DL3008
RUN mkdir -p /usr/share/man/man1 \
    && apt-get update \
    && apt-get install -y --no-install-recommends openjdk-17-jre-headless \
    && rm -rf /var/lib/apt/lists/*

# Caches go to /tmp: compose mounts the root filesystem read-only with a tmpfs there.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    XDG_CACHE_HOME=/tmp/.cache

WORKDIR /app

# Pinned first, in a layer of its own: the largest download, and it changes least.
RUN pip install --no-cache-dir torch==2.14.1 torchvision==0.29.1

# The remaining dependencies with exactly the pins in pyproject.toml (read from it, so they
# cannot drift), before the sources are copied so code edits reuse this layer.
COPY pyproject.toml ./
RUN python -c "import tomllib; deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; print(*deps, sep='\n')" > /tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# Generated gRPC code is built here, never copied from the build context; then the package
# itself (its dependencies are already in place).
COPY proto/ proto/
COPY refit/ refit/
COPY service/ service/
COPY trainer/ trainer/
RUN python proto/generate.py \
    && pip install --no-cache-dir --no-deps . \
    && rm -rf build ./*.egg-info

# Unprivileged user; the only places it writes are the ones compose mounts writable.
# Numeric so that runtimes can check it is not root without reading /etc/passwd.
RUN groupadd --system --gid 10001 refit \
    && useradd --system --uid 10001 --gid refit --create-home --home-dir /home/refit refit \
    && mkdir -p /var/lib/torchserve/model-store /var/log/torchserve \
    && chown 10001:10001 /var/lib/torchserve/model-store /var/log/torchserve
USER 10001:10001

CMD ["python", "-m", "service.server"]
