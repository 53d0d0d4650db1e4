#!/usr/bin/env bash
# Make sure a Docker engine answers. Where none does (a machine without systemd), start
# Debian's dockerd in the background, in this network namespace (builds download through
# it: start it from one with a route out), and wait until `docker info` answers. Silent on
# success; one line and exit 1 when it cannot.
# Prints nothing else; the engine's log goes to $DOCKERD_LOG (default /var/log/dna-dockerd.log).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/docker-cli.sh

"$DOCKER" info >/dev/null 2>&1 && exit 0
if ! command -v dockerd >/dev/null 2>&1; then
  echo "dockerd: not installed (scripts/bootstrap.sh images installs Debian's docker.io)" >&2
  exit 1
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "dockerd: no Docker engine answers, and starting one needs root" >&2
  exit 1
fi
log="${DOCKERD_LOG:-/var/log/dna-dockerd.log}"
setsid dockerd >>"$log" 2>&1 </dev/null &
for _ in $(seq 120); do
  "$DOCKER" info >/dev/null 2>&1 && exit 0
  sleep 0.5
done
echo "dockerd: started, but no answer within 60 s; the end of $log:" >&2
tail -n 15 "$log" >&2
exit 1
