# The project's test command: `make test` (also what .ci/run calls).
# It installs what the tests need when it is missing, then builds once in
# release mode and runs every test of the workspace, benches in test mode.

CARGO ?= cargo

.PHONY: test build lint fmt bench-merge

test:
	$(CARGO) test --release --workspace --all-targets

build:
	$(CARGO) build --release

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --release --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

bench-merge:
	$(CARGO) run --release -- bench merge --params 1B --experts 3 --dtype bf16
