#!/usr/bin/env bash
# Fuzzes the parsers a client or a checkpoint file can reach, each for a
# bounded time: the safetensors reader, the compact merge string, the
# mergekit YAML reader (fuzz/fuzz_targets/). Not part of `make test`: run
# `make fuzz` (FUZZ_SECONDS per target, default 60). Needs cargo-fuzz
# (installed from crates.io when missing); the stable toolchain builds it
# with RUSTC_BOOTSTRAP=1 (AddressSanitizer needs -Zsanitizer).
# Prints, per target, the executions run and whether a crash was found;
# exits non-zero on a crash (the input is under fuzz/artifacts/<target>/).
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${FUZZ_SECONDS:-60}"
targets=("${@:-safetensors_reader compact_spec mergekit_yaml}")
command -v cargo-fuzz >/dev/null 2>&1 || cargo install --locked cargo-fuzz
export RUSTC_BOOTSTRAP=1
status=0
for t in ${targets[@]}; do
  mkdir -p "fuzz/corpus/$t"
  cp -n fuzz/seeds/"$t"/* "fuzz/corpus/$t/" 2>/dev/null || true
  log="fuzz/target/$t.log"
  mkdir -p fuzz/target
  if (cd fuzz && cargo fuzz run --sanitizer address "$t" "corpus/$t" -- \
        -max_total_time="$seconds" -max_len=65536 -rss_limit_mb=2048 -timeout=10 \
        -print_final_stats=1) >"$log" 2>&1; then
    outcome="no crash"
  else
    outcome="CRASH (see $log and fuzz/artifacts/$t/)"
    status=1
  fi
  runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1)
  cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 | grep -o '[0-9]*')
  echo "$t: ${runs:-?} executions in ${seconds}s, coverage ${cov:-?} edges, corpus $(ls "fuzz/corpus/$t" | wc -l) inputs: $outcome"
done
exit $status
