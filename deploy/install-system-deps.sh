#!/usr/bin/env bash
# System packages the suite and `make up` use: Prometheus (+promtool) and the Fashion-MNIST dataset.
# Installed with apt where available; otherwise says what is missing and carries on.
set -uo pipefail
need=()
command -v prometheus >/dev/null || need+=(prometheus)
[ -d /usr/share/datasets/fashion-mnist ] || need+=(dataset-fashion-mnist)
[ ${#need[@]} -eq 0 ] && exit 0
if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  apt-get update -qq >/dev/null && \
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null \
    && exit 0
fi
echo "note: could not install ${need[*]} (needs apt as root); Prometheus-based steps will say so" >&2
