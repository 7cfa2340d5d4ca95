//! `fusion merge` for the routed ensembles (`we_moe`, `sparse_we_moe`,
//! `rankone_moe`): build the MoE, train its routers on the calibration task
//! pool, and write it as a folder that `Model::load` (and the gateway) load.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::bail;
use candle_core::Device;
use merger::merge::Resolver;
use merger::moe::{self, MoeParams};
use merger::spec::MergeSpec;
use runtime::checkpoint::{Checkpoint, WriteOptions};

/// What the routed build needs beyond the spec.
pub struct MoeOptions {
    /// Output layout and overwrite policy.
    pub write: WriteOptions,
    /// Show progress bars (only when stderr is a terminal).
    pub progress: bool,
    /// Task pool folder of unlabeled inputs.
    pub calibration: Option<PathBuf>,
}

/// Builds, trains and writes the routed ensemble `spec`.
pub fn run(
    spec: &MergeSpec,
    resolve: Resolver,
    out: &Path,
    device: &Device,
    opts: &MoeOptions,
) -> anyhow::Result<()> {
    let params = MoeParams::from_spec(spec)?;
    let calibration = match (&opts.calibration, params.needs_calibration()) {
        (Some(dir), true) => {
            let items = moe::calibration::from_task_pool(dir, &resolve(&params.base)?)?;
            let (texts, choices, tokens) = moe::calibration::summary(&items);
            eprintln!(
                "calibration: {texts} texts and {choices} multiple-choice inputs ({tokens} tokens) from {}",
                dir.display()
            );
            items
        }
        (None, true) => bail!(
            "`{}` trains its routers on unlabeled inputs: pass --calibration DIR (a task pool folder), \
             or set `router_checkpoint` or `steps=0` (untrained routers: task arithmetic)",
            params.method.name()
        ),
        (Some(_), false) => {
            eprintln!("note: --calibration is unused (steps=0 or a router_checkpoint is given)");
            Vec::new()
        }
        (None, false) => Vec::new(),
    };
    let open = |name: &str| Ok(Checkpoint::open(name, &resolve(name)?)?);
    let id = moe::merge_id(spec, &open, &calibration)?;
    let start = Instant::now();
    let built = moe::build(spec, &open, &calibration, device, opts.progress)?;
    let seconds = start.elapsed().as_secs_f64();
    let dir = built.save(out, &opts.write)?;
    let counts = built.param_counts()?;
    let meta = built.meta();
    eprintln!(
        "built {} over {} experts (routing {}) in {seconds:.2}s on {}: backbone {} params, \
         experts {} values ({} non-zero), routers {} params, {:.1} MB resident",
        meta.method.name(),
        meta.num_experts,
        meta.routing.name(),
        runtime::device::device_name(device),
        counts.backbone,
        counts.expert_values,
        counts.expert_nonzero,
        counts.router,
        built.bytes() as f64 / 1e6
    );
    if let Some(t) = &meta.training {
        eprintln!(
            "routers trained: {} steps (batch {}, lr {}) in {:.2}s ({:.1} ms/step); \
             objective `{}` {:.4} -> {:.4}",
            t.steps,
            t.batch_size,
            t.lr,
            t.seconds,
            1e3 * t.seconds / t.steps.max(1) as f64,
            t.entropy_positions.name(),
            t.entropy_before,
            t.entropy_after
        );
    }
    eprintln!("-> {} (merge-{id})", dir.display());
    Ok(())
}
