# The two commands of the README, plus the checks CI runs.
#   make demo   – set up, build, run the demo workflow (TEXT=caronirocks)
#   make test   – set up, build, run every test
TEXT ?= caronirocks

.PHONY: setup demo test check bench

setup:
	@scripts/setup.sh

demo: setup
	cargo run -q -p caroni-cli --bin caroni -- demo $(TEXT)

test: setup
	cargo build --workspace --bins
	@if docker info >/dev/null 2>&1; then deploy/build-image.sh; else echo "no Docker engine reachable: the multi-host tests will be skipped"; fi
	cargo nextest run --workspace --no-fail-fast

check: setup
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings

# Criterion micro-benchmarks (envelopes, store commits, engine handling),
# in the same profile as the tests so that nothing is compiled twice. The
# end-to-end benchmark is `caroni bench` (see README).
bench: setup
	cargo bench --profile dev -p caroni-tests --bench micro
