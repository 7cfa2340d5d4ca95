//! `fusion merge` for the data-driven methods (`fisher_merging`,
//! `regmean`, `regmean_plusplus`, `adamerging`, `ada_svd`): the calibration
//! task pool each expert's statistics come from, and what the merge did.

use std::path::Path;

use anyhow::bail;
use candle_core::Device;
use merger::data_driven::{DataParams, StatsCache};
use merger::merge::Resolver;
use merger::moe::calibration::{self, CalibrationItem};
use merger::plan::DataWritten;

/// The calibration inputs and their task names: the task pool folder
/// `--calibration` names, tokenised for the reference checkpoint (the base,
/// else the first expert); none for AdaMerging with `steps=0`.
pub fn calibration(
    params: &DataParams,
    dir: Option<&Path>,
    resolve: Resolver,
) -> anyhow::Result<(Vec<CalibrationItem>, Vec<String>)> {
    let reference = params.base.as_ref().unwrap_or(&params.experts[0]);
    Ok(match (dir, params.needs_calibration()) {
        (Some(dir), true) => {
            let items = calibration::from_task_pool(dir, &resolve(reference)?)?;
            let sources = calibration::source_names(dir)?;
            let (texts, choices, tokens) = calibration::summary(&items);
            eprintln!(
                "calibration: {texts} texts and {choices} multiple-choice inputs ({tokens} tokens) \
                 in tasks {} from {}",
                sources.join(", "),
                dir.display()
            );
            (items, sources)
        }
        (None, true) => bail!(
            "`{}` runs each expert on its own task's inputs: pass --calibration DIR, a task pool \
             folder with a task named after each expert's folder (`<name>.<kind>.jsonl`)",
            params.method.name()
        ),
        (Some(_), false) => {
            eprintln!("note: --calibration is unused (adamerging with steps=0 is task arithmetic)");
            (Vec::new(), Vec::new())
        }
        (None, false) => (Vec::new(), Vec::new()),
    })
}

/// Prints what the merge did.
pub fn print_report(written: &DataWritten, stats: &StatsCache, device: &Device) {
    let r = &written.report;
    let samples: Vec<String> = r.samples.iter().map(|(n, k)| format!("{n}: {k}")).collect();
    eprintln!(
        "merged in {:.2}s on {} -> {} (merge-{}): {} calibration batches in {:.2}s, \
         statistics {} from the cache and {} computed ({}), inputs per expert: {}",
        written.seconds,
        runtime::device::device_name(device),
        written.out.display(),
        written.id,
        r.forward_batches,
        r.calibration_seconds,
        r.stats_hits,
        r.stats_misses,
        stats.dir().display(),
        if samples.is_empty() {
            "none".to_string()
        } else {
            samples.join(", ")
        }
    );
    if let Some(t) = &r.training {
        eprintln!(
            "adamerging: {} steps in {:.2}s, entropy {:.4} -> {:.4}",
            t.steps, t.seconds, t.entropy_before, t.entropy_after
        );
    }
}
