# The two commands of the README, plus the checks CI runs.
#   make demo   – set up, build, run the demo workflow (TEXT=caronirocks)
#   make test   – set up, build, run every test (Rust, then the Python client's)
TEXT ?= caronirocks

.PHONY: setup demo test check bench fuzz conformance

setup:
	@scripts/setup.sh

demo: setup
	@scripts/first-build-note.sh
	cargo run -p caroni-cli --bin caroni -- demo $(TEXT)

test:
	@scripts/setup.sh --test
	@# --all-targets, as clippy and nextest select: a narrower selection
	@# (--bins) resolves the build tools' features differently and would
	@# compile RocksDB's C++ a second time.
	cargo build --workspace --all-targets
	@if docker info >/dev/null 2>&1; then deploy/build-image.sh; else echo "no Docker engine reachable: the multi-host tests will be skipped"; fi
	@# A real single-node Slurm cluster for the Slurm executor's tests.
	conf=$$(scripts/slurm-up.sh) && SLURM_CONF=$$conf cargo nextest run --workspace --no-fail-fast
	scripts/python-client-test.sh
	@# The CWL conformance suite's `required` tag over a real mesh; fails when
	@# a test the reference runner passes on the shared copy does not pass.
	scripts/conformance.sh --tags required --gate --junit "$${TMPDIR:-/tmp}/caroni-required-conformance.xml"

check: setup
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings

# Criterion micro-benchmarks (envelopes, store commits, engine handling),
# in the same profile as the tests so that nothing is compiled twice. The
# end-to-end benchmark is `caroni bench` (see README).
bench: setup
	cargo bench --profile dev -p caroni-tests --bench micro

# Decoder properties at full count, then the protocol simulator over
# 50,000 seeds (CARONI_SIM_SEEDS). Decoder properties: 100,000 cases each of envelopes (bytes
# and signed absurd messages), protocol payloads, CWL documents, job-type
# files and configuration files; prints each one's count and time. `make
# test` runs the same properties with 2,000 cases.
fuzz: setup
	CARONI_FUZZ_CASES=$${CARONI_FUZZ_CASES:-100000} cargo nextest run --profile fuzz --workspace --no-fail-fast --no-capture -E 'test(/never_panic/)'
	CARONI_SIM_SEEDS=$${CARONI_SIM_SEEDS:-50000} cargo nextest run --profile fuzz --workspace --no-fail-fast --no-capture -E 'package(caroni-sim) and test(/seeded_faults/)'

# The CWL v1.2 conformance suite (CWL_CONFORMANCE, default ../shared/cwl-v1.2)
# over one manager and two agents as separate processes; counts per tag,
# JUnit report in conformance-results.xml. TAGS=required narrows it.
conformance: setup
	cargo build --workspace --bins
	scripts/conformance.sh $(if $(TAGS),--tags $(TAGS))
