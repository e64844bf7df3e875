#!/usr/bin/env bash
# The CWL v1.2 conformance suite over a real mesh: one manager and two
# agents as separate caroni-node processes on loopback (agents with
# --cwl-tools local), driven by cwltest (PyPI) through
# `caroni --node … cwl-runner`. Prints passed / failed / unsupported per tag
# and in total, and writes a JUnit report.
#
#   scripts/conformance.sh [--tags TAGS] [--only NAMES] [-j N] [--junit FILE] [--gate]
#
# --only runs the tests named (comma-separated ids, cwltest -s).
#
# With --gate the script fails when a `required` test did not pass that the
# reference runner passes on the same copy of the suite (its README lists
# the ones it misses); `make test` runs `--tags required --gate`.
#
# The suite is read where it is: CWL_CONFORMANCE (default ../shared/cwl-v1.2
# next to this repository); nothing of it is copied here.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
target="${CARGO_TARGET_DIR:-$repo/target}"
bin="${CARONI_BIN_DIR:-$target/debug}"
suite="${CWL_CONFORMANCE:-$repo/../shared/cwl-v1.2}"
tags=""
jobs=2
junit="$repo/conformance-results.xml"
gate=""
only=""
while [ $# -gt 0 ]; do
  case "$1" in
    --tags) tags="$2"; shift 2 ;;
    --only) only="$2"; shift 2 ;;
    -j) jobs="$2"; shift 2 ;;
    --junit) junit="$2"; shift 2 ;;
    --gate) gate=1; shift ;;
    *) echo "conformance: unknown argument $1" >&2; exit 2 ;;
  esac
done
if [ -z "${CWL_CONFORMANCE:-}" ] && [ ! -f "$suite/conformance_tests.yaml" ] && [ -f /work/shared/cwl-v1.2/conformance_tests.yaml ]; then
  # A clone elsewhere on this workplace's machines: the shared copy.
  suite=/work/shared/cwl-v1.2
fi
if [ ! -f "$suite/conformance_tests.yaml" ]; then
  echo "conformance: no suite at $suite (set CWL_CONFORMANCE to the CWL v1.2 conformance suite)" >&2
  if [ -n "$gate" ]; then
    echo "conformance: THE REQUIRED-TAG GATE DID NOT RUN" >&2
    exit 0
  fi
  exit 2
fi
[ -x "$bin/caroni-node" ] && [ -x "$bin/caroni" ] || { echo "conformance: build first (cargo build --workspace --bins)" >&2; exit 2; }

work=$(mktemp -d /tmp/caroni-conformance.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

venv="${CWLTEST_VENV:-/var/cache/caroni-cwltest-venv}"
if [ ! -x "$venv/bin/cwltest" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "cwltest==2.6.*"
fi

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'; }
start_node() { # name role extra...
  local name=$1 role=$2; shift 2
  local api; api=$(free_port)
  local p2p; p2p=$(free_port)
  RUST_LOG=warn "$bin/caroni-node" --data-dir "$work/$name" --role "$role" \
    --api-listen "127.0.0.1:$api" --peer-listen "127.0.0.1:$(free_port)" \
    --p2p-listen "/ip4/127.0.0.1/tcp/$p2p" --mdns false --console-listen off "$@" \
    >"$work/$name.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 1 600); do
    "$bin/caroni" --node "http://127.0.0.1:$api" node info >/dev/null 2>&1 && break
    sleep 0.1
  done
  "$bin/caroni" --node "http://127.0.0.1:$api" node info >/dev/null
  eval "${name}_api=$api ${name}_p2p=$p2p"
}
start_node manager manager
start_node agent1 agent --cwl-tools local --bootstrap "/ip4/127.0.0.1/tcp/$manager_p2p"
start_node agent2 agent --cwl-tools local --bootstrap "/ip4/127.0.0.1/tcp/$manager_p2p"

runner="$work/caroni-cwl-runner"
cat >"$runner" <<RUNNER
#!/bin/sh
exec "$bin/caroni" --node "http://127.0.0.1:$manager_api" cwl-runner "\$@"
RUNNER
chmod +x "$runner"

args=(--test conformance_tests.yaml --tool "$runner" -j "$jobs" --timeout 300 --junit-xml "$junit")
[ -n "$tags" ] && args+=(--tags "$tags")
[ -n "$only" ] && args+=(-s "$only")
start=$(date +%s)
set +e
(cd "$suite" && "$venv/bin/cwltest" "${args[@]}") >"$work/cwltest.log" 2>&1
rc=$?
set -e
end=$(date +%s)
tail -n 1 "$work/cwltest.log"
[ -n "${CONFORMANCE_LOG:-}" ] && cp "$work/cwltest.log" "$CONFORMANCE_LOG"
if [ -n "$gate" ]; then
  set +e
  python3 "$repo/scripts/conformance_counts.py" --gate "$suite/README.md" "$junit"
  status=$?
  set -e
  echo "wall time: $((end - start)) s (-j $jobs)"
  if [ "$status" -ne 0 ]; then
    # Each test that failed the gate runs once more, alone, on the same
    # mesh: one that passes then is reported as flaky (and does not fail
    # the gate); one that fails again fails it, with its output.
    python3 "$repo/scripts/conformance_counts.py" --gate-misses "$suite/README.md" "$junit" >"$work/again.list"
    numbers=$(cut -d' ' -f1 "$work/again.list" | paste -sd, -)
    again=$(cut -d' ' -f2 "$work/again.list" | paste -sd, -)
    if [ -n "$numbers" ]; then
      echo "conformance: running again, one at a time: $again"
      set +e
      (cd "$suite" && "$venv/bin/cwltest" --test conformance_tests.yaml --tool "$runner" -j 1 --timeout 300 \
        --junit-xml "$work/again.xml" -n "$numbers") >"$work/again.log" 2>&1
      python3 "$repo/scripts/conformance_counts.py" --gate "$suite/README.md" "$work/again.xml" >"$work/again.gate" 2>&1
      status=$?
      set -e
      tail -n 1 "$work/again.gate"
      if [ "$status" -eq 0 ]; then
        echo "conformance: FLAKY (failed once, passed alone): $again"
      else
        echo "conformance: the second run's output:" >&2
        grep -v '^Test \[' "$work/again.log" | tail -n 40 >&2
      fi
    fi
  fi
  if [ "$status" -ne 0 ]; then
    echo "conformance: the last lines of the nodes' logs:" >&2
    for n in manager agent1 agent2; do tail -n 5 "$work/$n.log" | sed "s/^/  $n: /" >&2; done
  fi
  exit "$status"
fi
python3 "$repo/scripts/conformance_counts.py" "$junit"
echo "wall time: $((end - start)) s (-j $jobs)"
exit 0
