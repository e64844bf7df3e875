#!/usr/bin/env bash
# Builds the image `caroni:local` (caroni-node + caroni + the demo fixtures).
#
# No registry is reachable here, so the base image is assembled from this
# machine's own files: bash, a few coreutils, jq and the shared libraries the
# binaries link, imported with `docker import` as `caroni-base:local`. The
# Dockerfile takes its base as a build argument, so elsewhere the same file
# builds on a public image:
#   docker build --build-arg BASE=debian:bookworm-slim ...   (with jq installed)
#
# Usage: deploy/build-image.sh [BIN_DIR]   (default: $CARGO_TARGET_DIR/debug
# or target/debug; build first with `cargo build --workspace --bins`)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/.." && pwd)"
bin_dir="${1:-${CARGO_TARGET_DIR:-$root/target}/debug}"
for b in caroni-node caroni; do
  [ -x "$bin_dir/$b" ] || { echo "build-image: $bin_dir/$b is missing; run: cargo build --workspace --bins" >&2; exit 1; }
done

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
rootfs="$work/rootfs"
mkdir -p "$rootfs"/{bin,usr/bin,usr/local/bin,etc,tmp,var/lib/caroni,root}
chmod 1777 "$rootfs/tmp"

tools=(bash sh env cat echo printf sleep seq true false ls mkdir rm cp mv head tail tr wc sort uniq date id kill ps grep sed tee jq)
copy_with_libs() {
  local src="$1" dst="$2"
  install -D -m 0755 "$src" "$rootfs$dst"
  ldd "$src" 2>/dev/null | awk '/=>/ {print $3} /^[ \t]*\/lib/ {print $1}' | while read -r lib; do
    [ -n "$lib" ] && [ -e "$lib" ] && install -D -m 0755 "$(readlink -f "$lib")" "$rootfs$lib"
  done
}
for t in "${tools[@]}"; do
  p="$(command -v "$t" || true)"
  [ -n "$p" ] && [ -x "$p" ] && copy_with_libs "$(readlink -f "$p")" "/usr/bin/$t"
done
ln -sf /usr/bin/bash "$rootfs/bin/bash"
ln -sf /usr/bin/sh "$rootfs/bin/sh"
echo 'root:x:0:0:root:/root:/bin/bash' > "$rootfs/etc/passwd"
echo 'root:x:0:' > "$rootfs/etc/group"
printf 'hosts: files dns\n' > "$rootfs/etc/nsswitch.conf"
# Libraries the Caroni binaries link (libstdc++ for RocksDB, libgcc_s, libm, libc).
copy_with_libs "$bin_dir/caroni-node" /tmp/probe && rm -f "$rootfs/tmp/probe"
# glibc's name resolution modules (hostname → address inside a network).
for m in /lib/x86_64-linux-gnu/libnss_files.so.2 /lib/x86_64-linux-gnu/libnss_dns.so.2 /lib/x86_64-linux-gnu/libresolv.so.2; do
  [ -e "$m" ] && install -D -m 0644 "$(readlink -f "$m")" "$rootfs$m"
done

tar -C "$rootfs" -c . | docker import - caroni-base:local >/dev/null

ctx="$work/ctx"
mkdir -p "$ctx"
cp "$bin_dir/caroni-node" "$bin_dir/caroni" "$ctx/"
strip "$ctx/caroni-node" "$ctx/caroni" 2>/dev/null || true
cp -r "$root/examples" "$ctx/examples"
cp "$here/entrypoint.sh" "$ctx/"
docker build -q -t caroni:local -f "$here/Dockerfile" --build-arg BASE=caroni-base:local "$ctx" >/dev/null
size=$(docker image inspect caroni:local --format '{{.Size}}')
echo "built caroni:local ($((size / 1024 / 1024)) MiB)"
