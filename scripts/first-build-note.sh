#!/usr/bin/env bash
# Says once, before the first build, that it compiles RocksDB's C++ and
# about how long that takes here; silent once RocksDB is built in the
# target directory.
set -euo pipefail
target="${CARGO_TARGET_DIR:-target}"
if compgen -G "$target/debug/build/librocksdb-sys-*/out/librocksdb.a" >/dev/null; then
  exit 0
fi
cores=$(nproc 2>/dev/null || echo 2)
# Measured from a fresh clone on a 2-core machine: the whole first build
# took 16 min, of which RocksDB's C++ took 12 (its 343 files at -O1).
whole=$(( (16 * 2 + cores - 1) / cores ))
rocks=$(( (12 * 2 + cores - 1) / cores ))
cat <<MSG
==> First build: besides the Rust crates it compiles RocksDB's C++ (343
    files). Expect about ${whole} minutes on this machine's ${cores} cores, ${rocks} of
    them in RocksDB, whose step shows as "librocksdb-sys(build)" in
    cargo's progress bar below. Later builds reuse it (kept in ${target}).
MSG
