#!/usr/bin/env bash
# Installs clients/python into a fresh virtual environment (as a user would:
# `pip install ./clients/python`, which generates the stubs with grpcio-tools)
# and runs its pytest suite against real caroni-node processes built in the
# cargo target directory. Bounded to 10 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
target="${CARGO_TARGET_DIR:-$repo/target}"
export CARONI_BIN_DIR="${CARONI_BIN_DIR:-$target/debug}"
[ -x "$CARONI_BIN_DIR/caroni-node" ] || { echo "python-client-test: $CARONI_BIN_DIR/caroni-node is missing; run cargo build --workspace --bins first" >&2; exit 1; }

venv=$(mktemp -d /tmp/caroni-pyclient.XXXXXX)
trap 'rm -rf "$venv"' EXIT
python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$repo/clients/python[test]"
# The build leaves setuptools' work files next to the sources.
rm -rf "$repo/clients/python/build" "$repo"/clients/python/src/*.egg-info
cd "$repo/clients/python"
timeout 600 "$venv/bin/python" -m pytest -p no:cacheprovider -q tests "$@"
