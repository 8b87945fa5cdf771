#!/usr/bin/env bash
# A Docker engine for the container test and image builds, on a machine without systemd.
#   engine.sh start   installs Debian's docker.io, docker-compose (v1) and mmdebstrap when
#                     missing (root and apt needed), and starts dockerd when none answers
#   engine.sh stop    stops the dockerd that `start` started, if any (never another one)
# The daemon's log: /tmp/refit-dockerd.log.
set -euo pipefail
PIDFILE=/tmp/refit-dockerd.pid
LOG=/tmp/refit-dockerd.log

install_missing() {
  local need=()
  command -v dockerd >/dev/null || need+=(docker.io)
  command -v docker-compose >/dev/null || need+=(docker-compose)
  command -v mmdebstrap >/dev/null || need+=(mmdebstrap)
  [ ${#need[@]} -eq 0 ] && return
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "engine.sh: ${need[*]} missing; install them (root and apt needed)" >&2
    exit 1
  fi
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
}

start() {
  install_missing
  docker info >/dev/null 2>&1 && return
  # Its own session, so that nothing waits on it; its pid, so that `stop` ends only this one.
  setsid dockerd >"$LOG" 2>&1 < /dev/null &
  echo $! >"$PIDFILE"
  for _ in $(seq 60); do
    docker info >/dev/null 2>&1 && return
    sleep 1
  done
  echo "engine.sh: dockerd did not answer within 60 s; its log:" >&2
  tail -20 "$LOG" >&2
  exit 1
}

stop() {
  [ -f "$PIDFILE" ] || return 0
  local pid
  pid=$(cat "$PIDFILE")
  rm -f "$PIDFILE"
  kill "$pid" 2>/dev/null || return 0
  for _ in $(seq 30); do
    kill -0 "$pid" 2>/dev/null || return 0
    sleep 1
  done
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
