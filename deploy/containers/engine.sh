#!/usr/bin/env bash
# A Docker engine for the container test and image builds, on a machine without systemd.
#   engine.sh start   installs Debian's docker.io, docker-compose (v1) and mmdebstrap when
#                     missing (root and apt needed), and starts dockerd when none answers
#   engine.sh stop    stops the dockerd that `start` started, if any (never another one)
# The daemon's log: /tmp/refit-dockerd.log.
set -euo pipefail
PIDFILE=${REFIT_DOCKERD_PIDFILE:-/tmp/refit-dockerd.pid}
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
    docker info >/dev/null 2>&1 && { remove_stale_test_stacks; return; }
    sleep 1
  done
  echo "engine.sh: dockerd did not answer within 60 s; its log:" >&2
  tail -20 "$LOG" >&2
  exit 1
}

# Stacks of a container test that never reached `down -v` (killed, or the machine rebooted):
# their restart policies bring them back with the daemon, yet no test can be using them when
# this daemon has only just started.
remove_stale_test_stacks() {
  local label=com.docker.compose.project project
  local projects
  projects=$({
    docker ps -a --format "{{.Label \"$label\"}}"
    docker volume ls --format "{{.Label \"$label\"}}"
    docker network ls --format "{{.Label \"$label\"}}"
  } | grep '^refit-e2e-' | sort -u || true)
  for project in $projects; do
    echo "engine.sh: removing $project, left by an interrupted container test" >&2
    docker ps -aq --filter "label=$label=$project" | xargs -r docker rm -f >/dev/null
    docker volume ls -q --filter "label=$label=$project" | xargs -r docker volume rm >/dev/null
    docker network ls -q --filter "label=$label=$project" | xargs -r docker network rm >/dev/null
  done
}

stop() {
  [ -f "$PIDFILE" ] || return 0
  local pid
  pid=$(cat "$PIDFILE")
  rm -f "$PIDFILE"
  # A pid file from an earlier boot may name any process by now: end it only if it is dockerd.
  [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = dockerd ] || return 0
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
