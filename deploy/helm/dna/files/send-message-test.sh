#!/bin/sh
# `helm test`: a message through the network, with the `dna` CLI of the peer image.
# Bob and alice get fresh identities (names unique to this run), alice finds bob by name
# and sends; bob syncs until the message is in his inbox. Needs DNA_BOOTSTRAP (the
# bootstrap nodes) and a writable $TMPDIR; tests/deploy/test_chart.py runs this same file
# against a local testnet.
set -eu
run="$(od -An -N4 -tx4 /dev/urandom | tr -d ' \n')"
dir="${TMPDIR:-/tmp}/dna-helm-test-$run"
alice="helm-a-$run"
bob="helm-b-$run"
text="hello through the chart $run"
export DNA_PASSPHRASE="helm test $run"

echo "creating $bob and $alice through $DNA_BOOTSTRAP"
dna --home "$dir/bob" identity create --name "$bob"
dna --home "$dir/alice" identity create --name "$alice"
dna --home "$dir/alice" contacts add "$bob"
dna --home "$dir/alice" send "$bob" "$text"
echo "sent; waiting for $bob to receive it"
tries=0
until dna --home "$dir/bob" --json inbox | grep -q "$text"; do
  tries=$((tries + 1))
  if [ "$tries" -ge "${DNA_TEST_TRIES:-30}" ]; then
    echo "FAILED: $bob did not receive the message after $tries syncs" >&2
    exit 1
  fi
  sleep 2
done
echo "OK: $bob received \"$text\""
