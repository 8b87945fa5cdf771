# Prometheus, for the container test only (docker-compose.test.yml): no image registry is
# reachable where this project is tested, so Debian's prometheus package (2.42) stands in for
# prom/prometheus, with the same contract: the binary as entrypoint (compose passes the flags),
# user nobody, data in /prometheus, wget for the healthcheck.
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends prometheus wget \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /prometheus \
    && chown 65534:65534 /prometheus
USER 65534:65534
WORKDIR /prometheus
EXPOSE 9090
ENTRYPOINT ["/usr/bin/prometheus"]
