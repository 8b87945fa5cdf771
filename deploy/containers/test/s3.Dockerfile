# MinIO stand-in, for the container test only (docker-compose.test.yml): no MinIO image or
# binary can be obtained where this project is tested. s3_standin.py is moto's S3 server (memory
# only) with what MinIO adds that refit relies on: SigV4 authentication, per-identity policies,
# presigned URLs, the admin calls minio-init makes, and MinIO's liveness path. The image also
# carries awscli, the ordinary S3 client the test uploads its dataset with. Pins: pyproject.toml,
# s3-standin.
ARG BASE_IMAGE=python:3.11-slim-bookworm

# Its pins alone, so that other changes to pyproject.toml do not reinstall it.
FROM ${BASE_IMAGE} AS pins
COPY pyproject.toml deploy/containers/requirements.py /pins/
RUN python3 /pins/requirements.py /pins/pyproject.toml s3-standin > /pins/s3.txt

FROM ${BASE_IMAGE} AS installer
ARG PIP_INDEX_URL=https://pypi.org/simple
ARG PIP_EXTRA_INDEX_URL
ARG PIP_TRUSTED_HOST
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_CERT=/etc/ssl/certs/ca-certificates.crt
COPY deploy/containers/ca/ /usr/local/share/ca-certificates/refit-build/
RUN update-ca-certificates && python3 -m venv /opt/venv
COPY --from=pins /pins/s3.txt /build/
RUN /opt/venv/bin/pip install -r /build/s3.txt

FROM ${BASE_IMAGE}
COPY --from=installer /opt/venv /opt/venv
# The stand-in as a package (python -m deploy.containers.test.s3_standin); deploy/ itself is a
# namespace package there (.dockerignore keeps deploy/__init__.py out of the build context).
COPY deploy/containers/__init__.py /opt/standin/deploy/containers/
COPY deploy/containers/test/__init__.py deploy/containers/test/s3_standin.py \
     deploy/containers/test/sigv4.py deploy/containers/test/minio_admin.py \
     /opt/standin/deploy/containers/test/
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/opt/standin \
    PYTHONDONTWRITEBYTECODE=1
USER 65534:65534
EXPOSE 9000
HEALTHCHECK --interval=5s --timeout=5s --retries=12 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9000/minio/health/live', timeout=3)"]
# The root identity comes from MINIO_ROOT_USER and MINIO_ROOT_PASSWORD, as MinIO's does.
CMD ["python", "-m", "deploy.containers.test.s3_standin", "--host", "0.0.0.0", "--port", "9000"]
