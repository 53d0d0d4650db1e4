#!/usr/bin/env bash
# make images: build every image of deploy/docker/Dockerfile as dna-<target>:$TAG (default
# `local`) and dna-<target>:<version>, with the build cache (a rebuild after no change takes
# seconds), then list them with their sizes.
#
# The base: $BASE if set; else python:3.11-slim-bookworm if it is here or can be pulled; else
# (no registry reachable) a Debian bookworm base made with mmdebstrap from this machine's apt
# sources, imported as dna-base:bookworm-<recipe hash> (made once, about 30 s).
# Behind a TLS-inspecting proxy the builds trust $CA_BUNDLE (default: $SSL_CERT_FILE or
# Debian's bundle), passed as a BuildKit secret; PIP_INDEX_URL / UV_DEFAULT_INDEX (or pip's
# configured index-url) are passed on when this machine uses another index than PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/docker-cli.sh

TAG="${TAG:-local}"
TARGETS=(bootstrap storage stun peer router redis prometheus)
STANDARD_BASE="python:3.11-slim-bookworm"

scripts/dockerd.sh

# --- the base ---------------------------------------------------------------------------
apt_sources() {
  # This machine's Debian sources (its mirror), in the format mmdebstrap reads on stdin.
  if [ -n "${MIRROR_SOURCES:-}" ]; then cat "$MIRROR_SOURCES"
  elif [ -f /etc/apt/sources.list.d/debian.sources ]; then cat /etc/apt/sources.list.d/debian.sources
  else grep -h '^deb ' /etc/apt/sources.list
  fi
}

# mmdebstrap: Python 3.11 (python3-venv for the build stage's pip), CA certificates;
# merged /usr without the usrmerge package (which pulls in perl); no docs, man pages or
# locales; no apt lists.
MMDEBSTRAP_ARGS=(
  --variant=minbase --include=python3,python3-venv,ca-certificates
  --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr
  --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright'
  --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/info/*'
  --dpkgopt='path-exclude=/usr/share/locale/*'
  --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*'
)

# mmdebstrap downloads from the mirror: in the Docker engine's network namespace (where
# the builds download too), also when this runs inside another one without a route out
# (the tests' namespaces on a shared machine).
HOST_NET=()
engine="$(pgrep -o -x dockerd || true)"
if [ -n "$engine" ] && [ "$(id -u)" -eq 0 ] \
  && [ "$(readlink "/proc/$engine/ns/net")" != "$(readlink /proc/self/ns/net)" ]; then
  HOST_NET=(nsenter "--net=/proc/$engine/ns/net")
fi

local_base() {
  local recipe name
  recipe="$(printf '%s\n' "${MMDEBSTRAP_ARGS[@]}"; apt_sources)"
  name="dna-base:bookworm-$(printf '%s' "$recipe" | sha256sum | cut -c1-12)"
  if ! "$DOCKER" image inspect "$name" >/dev/null 2>&1; then
    echo "images: no registry answers; making $name with mmdebstrap (about 30 s)" >&2
    # Into a file first: piped, a failed mmdebstrap would still leave an (empty) image.
    local tarball
    tarball="$(mktemp --suffix=.tar)"
    if ! apt_sources | "${HOST_NET[@]}" mmdebstrap --quiet "${MMDEBSTRAP_ARGS[@]}" bookworm "$tarball" -; then
      rm -f "$tarball"
      echo "images: mmdebstrap failed (its messages are above)" >&2
      return 1
    fi
    "$DOCKER" import --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' "$tarball" "$name" >/dev/null
    rm -f "$tarball"
  fi
  echo "$name"
}

pick_base() {
  if [ -n "${BASE:-}" ]; then echo "$BASE"; return; fi
  if "$DOCKER" image inspect "$STANDARD_BASE" >/dev/null 2>&1 \
    || "$DOCKER" pull --quiet "$STANDARD_BASE" >/dev/null 2>&1; then
    echo "$STANDARD_BASE"
    return
  fi
  local_base
}

# --- the builds -------------------------------------------------------------------------
VERSION="$(python3 -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')"

build_args() {  # one per line
  echo "--label=org.opencontainers.image.version=$VERSION"
  echo "--label=org.opencontainers.image.revision=$(git rev-parse HEAD 2>/dev/null || echo unknown)"
  echo "--label=org.opencontainers.image.source=$(git remote get-url origin 2>/dev/null || true)"
  local index="${PIP_INDEX_URL:-$(python3 -m pip config get global.index-url 2>/dev/null || true)}"
  if [ -n "$index" ]; then echo "--build-arg=PIP_INDEX_URL=$index"; fi
  local uv_index="${UV_DEFAULT_INDEX:-${UV_INDEX_URL:-}}"
  if [ -n "$uv_index" ]; then echo "--build-arg=UV_DEFAULT_INDEX=$uv_index"; fi
  local ca="${CA_BUNDLE:-${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}}"
  if [ -f "$ca" ]; then echo "--secret=id=cacert,src=$ca"; fi
}

base="$(pick_base)" || exit 1
mapfile -t args < <(build_args)
echo "images: base $base" >&2
for target in "${TARGETS[@]}"; do
  start=$SECONDS
  "$DOCKER" build --quiet -f deploy/docker/Dockerfile --target "$target" \
    --build-arg "BASE=$base" "${args[@]}" \
    -t "dna-$target:$TAG" -t "dna-$target:$VERSION" . >/dev/null
  echo "images: dna-$target:$TAG built ($((SECONDS - start)) s)" >&2
done
# The images these builds replaced (untagged now): ours only, by their label.
"$DOCKER" image prune --force --filter 'label=org.opencontainers.image.vendor=DNA Messenger' >/dev/null
"$DOCKER" image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' \
  | grep -E "^dna-($(IFS='|'; echo "${TARGETS[*]}")):$TAG " | sort
