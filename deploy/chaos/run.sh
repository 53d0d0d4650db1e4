#!/usr/bin/env bash
# The resilience suite on a real cluster running the dna chart (NOT RUN HERE: this
# project's machines cannot run a Kubernetes API server, so this has never run against a
# cluster):
#   deploy/chaos/run.sh RELEASE NAMESPACE [SCENARIO...] [-- dna-testnet options, e.g. --seed 7]
# Same scenarios (scenarios.yaml, generated from dna_testnet.resilience.scenarios) and the
# same history checker as `make resilience` on compose. Needs kubectl and helm pointed at
# the cluster, Chaos Mesh installed (pause, partition and loss apply chaos-mesh/*.yaml), and
# this repository's tools (`uv sync`). It starts the two peers of peers.yaml (alice, bob),
# runs `dna-testnet resilience --driver kubectl`, and removes the peers again.
set -euo pipefail
[ $# -ge 2 ] || { echo "usage: $0 RELEASE NAMESPACE [SCENARIO...] [-- OPTIONS]" >&2; exit 2; }
release="$1"; namespace="$2"; shift 2
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"

known="$(awk '/^- name: / { print $3 }' "$here/scenarios.yaml")"
args=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do
  if ! grep -qx -- "$1" <<<"$known"; then
    echo "no scenario '$1' in scenarios.yaml (known: $(echo $known))" >&2
    exit 2
  fi
  args+=(--scenario "$1"); shift
done
[ "${1:-}" = "--" ] && shift

# The chart's bootstrap addresses and peer image, from its `helm test` pod.
hooks="$(helm get hooks "$release" -n "$namespace")"
seeds="$(awk '/name: DNA_BOOTSTRAP/ { getline; print $2; exit }' <<<"$hooks" | tr -d '"')"
image="$(awk '/image: / { print $2; exit }' <<<"$hooks" | tr -d '"')"
[ -n "$seeds" ] && [ -n "$image" ] || { echo "no helm test pod in release $release" >&2; exit 1; }

peers() {
  sed -e "s|NAMESPACE|$namespace|g" -e "s|RELEASE|$release|g" -e "s|SEEDS|$seeds|g" \
    -e "s|IMAGE|$image|g" "$here/peers.yaml"
}
cleanup() { peers | kubectl delete --ignore-not-found -f - || true; }
trap cleanup EXIT
peers | kubectl apply -f -
for peer in alice bob; do
  kubectl -n "$namespace" rollout status "statefulset/chaos-$peer" --timeout=600s
done

cd "$root"
uv run --locked dna-testnet resilience --driver kubectl --release "$release" \
  --namespace "$namespace" "${args[@]}" "$@"
