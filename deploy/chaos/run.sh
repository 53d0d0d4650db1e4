#!/usr/bin/env bash
# Run one resilience scenario of scenarios.yaml on a real cluster running the dna chart:
#   deploy/chaos/run.sh RELEASE NAMESPACE SCENARIO
# Needs kubectl and helm pointed at the cluster, and Chaos Mesh installed for the
# scenarios with a `manifest`. It sends a message through the network (`helm test`) while
# the fault lasts, heals, and sends one more after. NOT RUN HERE: this project's machines
# cannot run a Kubernetes API server, so this script has never run against a cluster.
set -euo pipefail
[ $# -eq 3 ] || { echo "usage: $0 RELEASE NAMESPACE SCENARIO" >&2; exit 2; }
release="$1"; namespace="$2"; scenario="$3"
here="$(cd "$(dirname "$0")" && pwd)"

field() {  # field NAME KEY: one key of one scenario in scenarios.yaml (plain awk: no PyYAML)
  awk -v want="$1" -v key="$2" '
    /^  - name: / { current = $3; if (current == want) found = 1; next }
    current == want && $1 == key ":" { sub(/^ *[a-z]+: */, ""); print; exit }
    END { if (!found) { print "no scenario \x27" want "\x27 in scenarios.yaml" > "/dev/stderr"; exit 1 } }
  ' "$here/scenarios.yaml"
}
seconds() { local d="$1"; echo "${d%s}"; }

manifest="$(field "$scenario" manifest)"
sequence="$(field "$scenario" kubectl)"
duration="$(seconds "$(field "$scenario" duration)")"
storage="statefulset/${release}-dna-storage"
echo "scenario $scenario: $(field "$scenario" about) (${duration}s)"

heal() {
  [ -n "$manifest" ] && sed -e "s/NAMESPACE/$namespace/g" -e "s/RELEASE/$release/g" \
    "$here/$manifest" | kubectl delete --ignore-not-found -f - || true
}
trap heal EXIT

case "$sequence" in
  kill-wipe)
    count="$(field "$scenario" count)"
    for i in $(seq 0 $((count - 1))); do
      pod="${release}-dna-storage-$i"
      kubectl -n "$namespace" delete pvc "data-$pod" --wait=false
      kubectl -n "$namespace" delete pod "$pod" --grace-period=0 --force
    done
    ;;
  rolling-restart)
    kubectl -n "$namespace" rollout restart "$storage"
    ;;
  "")
    sed -e "s/NAMESPACE/$namespace/g" -e "s/RELEASE/$release/g" "$here/$manifest" \
      | kubectl apply -f -
    ;;
  *) echo "unknown kubectl sequence $sequence" >&2; exit 2 ;;
esac

helm test "$release" -n "$namespace" --logs --timeout "$((duration + 300))s"
sleep "$duration"
heal
kubectl -n "$namespace" rollout status "$storage" --timeout=600s
helm test "$release" -n "$namespace" --logs
echo "scenario $scenario: messages went through during and after the fault"
