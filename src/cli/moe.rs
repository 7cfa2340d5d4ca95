//! `fusion merge` for the routed ensembles (`we_moe`, `sparse_we_moe`,
//! `rankone_moe`): the calibration task pool the routers train on, and what
//! the saved ensemble (a folder that `Model::load` and the gateway load) is
//! made of.

use std::path::Path;

use anyhow::bail;
use candle_core::Device;
use merger::merge::Resolver;
use merger::moe::calibration::{self, CalibrationItem};
use merger::moe::MoeParams;
use merger::plan::RoutedReport;

/// The inputs the routers train on: the task pool folder `--calibration`
/// names, tokenised with the base's tokenizer; none when the routers are
/// loaded (`router_checkpoint`) or left untrained (`steps=0`).
pub fn calibration(
    params: &MoeParams,
    dir: Option<&Path>,
    resolve: Resolver,
) -> anyhow::Result<Vec<CalibrationItem>> {
    Ok(match (dir, params.needs_calibration()) {
        (Some(dir), true) => {
            let items = calibration::from_task_pool(dir, &resolve(&params.base)?)?;
            let (texts, choices, tokens) = calibration::summary(&items);
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
    })
}

/// Prints what the built ensemble is made of and how its routers trained.
pub fn print_report(report: &RoutedReport, device: &Device) {
    let (counts, meta) = (&report.counts, &report.meta);
    eprintln!(
        "built {} over {} experts (routing {}) in {:.2}s on {}: backbone {} params, \
         experts {} values ({} non-zero), routers {} params, {:.1} MB resident",
        meta.method.name(),
        meta.num_experts,
        meta.routing.name(),
        report.seconds,
        runtime::device::device_name(device),
        counts.backbone,
        counts.expert_values,
        counts.expert_nonzero,
        counts.router,
        report.resident_bytes as f64 / 1e6
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
    eprintln!("-> {} (merge-{})", report.out.display(), report.id);
}
