//! Criterion benches of greedy generation (tokens/s, with the KV cache) on
//! `runtime::model` against candle-transformers' Llama on the same random
//! weights, for a demo-base-like tiny model and a 110M-parameter Llama.
//! Compare the elements/s criterion reports for `ours` and `candle_llama`
//! in each group; `fusion bench generate` prints the ratio directly.

use candle_core::Device;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

#[allow(dead_code)] // the CLI uses more of this module than the bench
#[path = "../src/bench/generate.rs"]
mod generate;

use generate::{Pair, Size};

fn greedy_generation(c: &mut Criterion) {
    for (size, tokens) in [(Size::Tiny, 64), (Size::M100, 16)] {
        let pair = Pair::new(size, 0, &Device::Cpu).expect("models");
        let prompt = pair.prompt(16);
        let mut group = c.benchmark_group(format!("generate_{}", size.name()));
        group.throughput(Throughput::Elements(tokens as u64));
        group.sample_size(10);
        group.bench_function("ours", |b| {
            b.iter(|| pair.generate_ours(&prompt, tokens).expect("generate"))
        });
        group.bench_function("candle_llama", |b| {
            b.iter(|| pair.generate_reference(&prompt, tokens).expect("generate"))
        });
        group.finish();
    }
}

criterion_group!(benches, greedy_generation);
criterion_main!(benches);
