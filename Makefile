# The project's test command: `make test` (also what .ci/run calls).
# It installs what the tests need when it is missing, then builds once in
# release mode and runs every test of the workspace, benches in test mode.

CARGO ?= cargo

.PHONY: test test-deps build lint fmt bench-merge

test: test-deps
	$(CARGO) test --release --workspace --all-targets

# numpy and safetensors for the reference implementations in tests/reference.
test-deps:
	@python3 -c "import numpy, safetensors" 2>/dev/null || python3 -m pip install --quiet numpy safetensors

build:
	$(CARGO) build --release

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --release --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

bench-merge:
	$(CARGO) run --release -- bench merge --params 1B --experts 3 --dtype bf16
