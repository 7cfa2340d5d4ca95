# The project's test command: `make test` (also what .ci/run calls).
# It installs what the tests need when it is missing (numpy + safetensors,
# promtool, Helm, kubernetes-validate, hadolint: scripts/install-tools.sh),
# builds once in release mode and runs every test of the workspace, benches in
# test mode and the crates' doctests, then checks the Dockerfiles and the Helm chart.

CARGO ?= cargo
export PATH := $(CURDIR)/.tools/bin:$(PATH)

.PHONY: test test-deps build lint fmt bench-merge check-deploy fuzz

test: test-deps
	$(CARGO) test --release --workspace --all-targets
	$(CARGO) test --release --workspace --doc
	scripts/check-deploy.sh

test-deps:
	@scripts/install-tools.sh

check-deploy: test-deps
	scripts/check-deploy.sh

build:
	$(CARGO) build --release

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --release --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

bench-merge:
	$(CARGO) run --release -- bench merge --params 1B --experts 3 --dtype bf16

# Fuzz the safetensors reader, the compact spec parser and the mergekit YAML
# reader, FUZZ_SECONDS each (default 60); not part of `make test`.
fuzz:
	scripts/fuzz.sh
