//! Criterion benches of merge throughput at a small size: a 20M-parameter
//! bf16 pool with three experts, against the memory-copy floor of the same
//! inputs (compare the GB/s criterion reports for each group member). As in
//! `fusion bench merge`, the merges run in memory on checkpoints opened
//! once; `task_arithmetic_to_disk` adds writing a checkpoint folder.

use std::path::PathBuf;
use std::sync::Arc;

use candle_core::{DType, Device};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use merger::merge::{merge_in_memory, merge_to_dir, MergeOptions, MergePlan, Progress};
use merger::throughput::copy_floor;
use runtime::checkpoint::{Checkpoint, WriteOptions};
use zoo::{pool_spec, synth, SynthOptions};

fn merge_throughput(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let dirs = synth(
        dir.path(),
        &SynthOptions {
            params: 20_000_000,
            experts: 3,
            dtype: DType::BF16,
            seed: 0,
            force: false,
        },
    )
    .expect("synth");
    let checkpoints: Vec<Arc<Checkpoint>> = dirs
        .iter()
        .enumerate()
        .map(|(i, d)| Checkpoint::open(&format!("m{i}"), d).expect("open"))
        .collect();
    let input: u64 = checkpoints.iter().map(|c| c.data_bytes()).sum();
    let out = dir.path().join("out");
    let resolve = |n: &str| -> merger::Result<PathBuf> { Ok(PathBuf::from(n)) };
    let opts = MergeOptions {
        write: WriteOptions {
            force: true,
            ..Default::default()
        },
        progress: false,
    };

    let mut group = c.benchmark_group("merge_20M_bf16_3experts");
    group.throughput(Throughput::Bytes(input));
    group.sample_size(10);
    group.bench_function("copy_floor", |b| b.iter(|| copy_floor(&checkpoints)));
    let by_path = |n: &str| -> merger::Result<Arc<Checkpoint>> {
        let i = dirs
            .iter()
            .position(|d| d.to_string_lossy() == n)
            .expect("a pool folder");
        Ok(checkpoints[i].clone())
    };
    for method in ["task_arithmetic", "ties_merging", "dare"] {
        let mut spec = pool_spec(method, &dirs);
        spec.seed = Some(1);
        group.bench_function(method, |b| {
            b.iter(|| {
                let mut plan = MergePlan::with_checkpoints(spec.clone(), &by_path).expect("plan");
                merge_in_memory(&mut plan, &Device::Cpu, &Progress::new(0, method, false))
                    .expect("merge")
            })
        });
    }
    let spec = pool_spec("task_arithmetic", &dirs);
    group.bench_function("task_arithmetic_to_disk", |b| {
        b.iter(|| merge_to_dir(spec.clone(), &resolve, &out, &Device::Cpu, &opts).expect("merge"))
    });
    group.finish();
}

criterion_group!(benches, merge_throughput);
criterion_main!(benches);
