# refit's images, one target per role (docker-compose.yml builds all three):
#   service     the gRPC front door: grpcio, protobuf, minio, prometheus-client. No torch.
#   torchserve  TorchServe 0.12 on JRE 17 with torch, the runtime of refit's model handler.
#   trainer     fine-tuning with the CUDA torch build (it runs on CPU too) and the ImageNet
#               backbone weights inside, so it starts with no network.
# Works with the classic builder (no BuildKit features), which builds every stage above the
# target: hence service first and torch last. Behind a TLS-intercepting proxy or a
# private package index: build args PIP_INDEX_URL / PIP_EXTRA_INDEX_URL / PIP_TRUSTED_HOST and
# CA certificates in deploy/containers/ca/ (docs/operations.md, "Building the images").
# pip runs only in builder stages: index URLs and CAs never reach a final image.

ARG BASE_IMAGE=python:3.11-slim-bookworm

# ---- Python 3.11, the unprivileged user and the environment every role shares ----------------
FROM ${BASE_IMAGE} AS base
# Caches go to /tmp: compose mounts the root filesystem read-only with a tmpfs there.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONPATH=/app \
    PATH=/opt/venv/bin:$PATH \
    XDG_CACHE_HOME=/tmp/.cache
# Numeric ids, so that runtimes can check it is not root without reading /etc/passwd.
RUN groupadd --system --gid 10001 refit \
    && useradd --system --uid 10001 --gid refit --home-dir /tmp --no-create-home \
        --shell /usr/sbin/nologin refit
WORKDIR /app

# ---- pip with the index and the CAs of this build; every venv is made here ------------------
FROM base AS builder
ARG PIP_INDEX_URL=https://pypi.org/simple
ARG PIP_EXTRA_INDEX_URL
ARG PIP_TRUSTED_HOST
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_CERT=/etc/ssl/certs/ca-certificates.crt
COPY deploy/containers/ca/ /usr/local/share/ca-certificates/refit-build/
RUN update-ca-certificates && python3 -m venv /opt/venv
WORKDIR /build

# Each role's pins, from pyproject.toml; the constraints give transitive packages the same pins.
# Stages copy only the lists they install, so a change to other pins rebuilds nothing of theirs.
FROM builder AS requirements
COPY pyproject.toml deploy/containers/requirements.py ./
RUN python requirements.py pyproject.toml --all > constraints.txt \
    && python requirements.py pyproject.toml codegen > codegen.txt \
    && python requirements.py pyproject.toml core > service.txt \
    && python requirements.py pyproject.toml --pins torch torchvision pillow > torch.txt \
    && python requirements.py pyproject.toml torchserve > torchserve.txt \
    && python requirements.py pyproject.toml core trainer > trainer.txt

# ---- generated gRPC code: refit's API, and TorchServe's from the .proto files in its jar -----
FROM builder AS codegen
COPY --from=requirements /build/codegen.txt /build/constraints.txt ./
RUN pip install -r codegen.txt -c constraints.txt
COPY proto/ proto/
RUN python proto/generate.py

FROM builder AS service-deps
COPY --from=requirements /build/service.txt /build/constraints.txt ./
RUN pip install -r service.txt -c constraints.txt

# ---- service ---------------------------------------------------------------------------------
FROM base AS service
COPY --from=service-deps /opt/venv /opt/venv
COPY deploy/containers/healthcheck.py deploy/containers/minio_init.py /opt/refit/
COPY refit/ refit/
COPY service/ service/
COPY --from=codegen /build/refit/ refit/
ENV REFIT_GRPC_ADDRESS=0.0.0.0:50051 \
    REFIT_HEALTH_ADDRESS=0.0.0.0:50054 \
    REFIT_METRICS_ADDRESS=0.0.0.0:9101
USER 10001:10001
EXPOSE 50051 50054 9101
# Health on its own server and thread: no load on the API can make this probe wait (issue 25).
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=6 \
    CMD ["python", "/opt/refit/healthcheck.py", "grpc", "env:REFIT_HEALTH_ADDRESS"]
CMD ["python", "-m", "service.server"]

# torch once, for both torch roles: its ~6 GB layer is shared by the two images, and rebuilt
# only when the torch, torchvision or Pillow pins change.
FROM builder AS torch-deps
COPY --from=requirements /build/torch.txt ./
RUN pip install -r torch.txt

# Each role's other packages go to a prefix of their own. pip sees torch installed in the venv
# and skips it, so the final images add only these on top of the shared torch layer.
FROM torch-deps AS torchserve-deps
COPY --from=requirements /build/torchserve.txt /build/constraints.txt ./
RUN pip install --prefix /opt/role -r torchserve.txt -c constraints.txt \
    && test -d /opt/role/lib/python3.11/site-packages

FROM base AS torch-runtime
COPY --from=torch-deps /opt/venv /opt/venv

# ---- torchserve ------------------------------------------------------------------------------
FROM torch-runtime AS torchserve
# TorchServe 0.12's frontend is Java 17. Slim images lack the man dir the JRE's postinst writes
# a symlink into. Not version-pinned: Debian security updates replace the package version, so a
# pin would break rebuilds; the base image fixes the release.
# hadolint ignore=DL3008
RUN mkdir -p /usr/share/man/man1 \
    && apt-get update \
    && apt-get install -y --no-install-recommends openjdk-17-jre-headless \
    && rm -rf /var/lib/apt/lists/*
COPY --from=torchserve-deps /opt/role/ /opt/venv/
COPY deploy/containers/healthcheck.py deploy/torchserve/keeper.py /opt/refit/
COPY deploy/torchserve/config.properties /etc/refit/torchserve.properties
# The model store is a cache (the object store is the source of truth): compose mounts a tmpfs.
RUN mkdir -p /var/lib/torchserve/model-store /var/log/torchserve \
    && chown 10001:10001 /var/lib/torchserve/model-store /var/log/torchserve
ENV LOG_LOCATION=/var/log/torchserve \
    METRICS_LOCATION=/var/log/torchserve
USER 10001:10001
# TorchServe writes its keys (key_file.json) in its working directory: compose's tmpfs.
WORKDIR /tmp
# REST inference, management, metrics; gRPC inference, management. Never publish them.
EXPOSE 8080 8081 8082 7070 7071
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=6 \
    CMD ["python", "/opt/refit/healthcheck.py", "http", "http://127.0.0.1:8080/ping", \
         "/tmp/key_file.json"]
# The keeper runs TorchServe with its token authorization on, replaces its keys every half
# lifetime and publishes them to the object store for the service and the trainer.
# --ncs: no config snapshots; the service registers every published version again after a restart.
CMD ["python", "/opt/refit/keeper.py", "--publish", "--", \
     "torchserve", "--start", "--foreground", "--ncs", \
     "--ts-config", "/etc/refit/torchserve.properties", \
     "--model-store", "/var/lib/torchserve/model-store"]

FROM torch-deps AS trainer-deps
COPY --from=requirements /build/trainer.txt /build/constraints.txt ./
RUN pip install --prefix /opt/role -r trainer.txt -c constraints.txt \
    && test -d /opt/role/lib/python3.11/site-packages

# ---- trainer ---------------------------------------------------------------------------------
FROM torch-runtime AS trainer
COPY --from=trainer-deps /opt/role/ /opt/venv/
COPY deploy/containers/healthcheck.py /opt/refit/
COPY refit/ refit/
COPY trainer/ trainer/
# The CLI's store commands for operators: `docker compose exec trainer python -m cli gc`.
COPY cli/ cli/
COPY --from=codegen /build/refit/ refit/
ENV REFIT_TRAINER_GRPC_ADDRESS=0.0.0.0:50052 \
    REFIT_TRAINER_HEALTH_ADDRESS=0.0.0.0:50053 \
    REFIT_TRAINER_METRICS_ADDRESS=0.0.0.0:9102
USER 10001:10001
EXPOSE 50052 50053 9102
# start period: it imports torch and may resume an interrupted job first. Health has a port and
# threads of its own (50053): job calls and watch streams cannot keep the probe waiting.
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=6 \
    CMD ["python", "/opt/refit/healthcheck.py", "grpc", "env:REFIT_TRAINER_HEALTH_ADDRESS"]
CMD ["python", "-m", "trainer.server"]
