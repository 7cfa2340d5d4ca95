//! What a search leaves behind: the trace as CSV and a plot of the best
//! score against evaluations as a small hand-written SVG (no plotting
//! crate: a polyline, dots, two axes with ticks).

use crate::search::config::{Objective, SearchConfig};
use crate::search::run::SearchOutcome;

/// `evaluation,generation,<each dimension>,score,best_so_far`, one line per
/// evaluation; raw values (fractions in [0, 1]).
pub fn trace_csv(cfg: &SearchConfig, outcome: &SearchOutcome) -> String {
    let mut header = vec!["evaluation".to_string(), "generation".to_string()];
    header.extend(cfg.dimensions.iter().map(|d| csv_cell(&d.name)));
    header.extend(["score".to_string(), "best_so_far".to_string()]);
    let mut out = header.join(",");
    out.push('\n');
    for e in &outcome.evaluations {
        let mut cells = vec![e.index.to_string(), e.generation.to_string()];
        cells.extend(e.values.iter().map(f64::to_string));
        cells.extend([e.score.to_string(), e.best.to_string()]);
        out.push_str(&cells.join(","));
        out.push('\n');
    }
    out
}

fn csv_cell(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// A horizontal reference line on the plot (a grid's best point, say).
#[derive(Debug, Clone, PartialEq)]
pub struct Reference {
    /// Its label.
    pub label: String,
    /// Its score (raw, as the trace has it).
    pub score: f64,
}

/// An SVG of each evaluation's score (dots) and the best so far (a step
/// line) against the evaluation index, with `references` as dashed lines.
/// Fractions (the average, accuracies) are shown in percent.
pub fn plot_svg(cfg: &SearchConfig, outcome: &SearchOutcome, references: &[Reference]) -> String {
    const W: f64 = 640.0;
    const H: f64 = 400.0;
    const LEFT: f64 = 64.0;
    const RIGHT: f64 = 24.0;
    const TOP: f64 = 40.0;
    const BOTTOM: f64 = 52.0;
    let percent = match &cfg.objective {
        Objective::Average => true,
        Objective::Task { metric, .. } => crate::metrics::is_fraction(metric),
    };
    let scale = if percent { 100.0 } else { 1.0 };
    let evals = &outcome.evaluations;
    let n = evals.len().max(1) as f64;
    let mut ys: Vec<f64> = evals.iter().map(|e| e.score * scale).collect();
    ys.extend(references.iter().map(|r| r.score * scale));
    let (mut lo, mut hi) = ys
        .iter()
        .filter(|y| y.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), y| {
            (a.min(*y), b.max(*y))
        });
    if !lo.is_finite() {
        (lo, hi) = (0.0, 1.0);
    }
    if hi - lo < 1e-9 {
        lo -= 0.5;
        hi += 0.5;
    }
    let (lo, hi, step) = nice_range(lo, hi);
    let px = |i: f64| LEFT + (i / n) * (W - LEFT - RIGHT);
    let py = |y: f64| TOP + (1.0 - (y - lo) / (hi - lo)) * (H - TOP - BOTTOM);
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\" viewBox=\"0 0 {W} {H}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"{W}\" height=\"{H}\" fill=\"white\"/>\n"
    );
    s.push_str(&format!(
        "<text x=\"{}\" y=\"22\" text-anchor=\"middle\" font-size=\"14\">{} search: best {} so far ({}, {} evaluations)</text>\n",
        W / 2.0,
        cfg.algorithm,
        escape(&cfg.objective.describe()),
        escape(&cfg.template.method),
        evals.len()
    ));
    // Axes, grid and ticks.
    let mut y = lo;
    while y <= hi + step * 1e-6 {
        s.push_str(&format!(
            "<line x1=\"{LEFT}\" x2=\"{}\" y1=\"{py:.1}\" y2=\"{py:.1}\" stroke=\"#e0e0e0\"/>\n\
             <text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>\n",
            W - RIGHT,
            LEFT - 6.0,
            py(y) + 4.0,
            tick_label(y, step),
            py = py(y),
        ));
        y += step;
    }
    let xstep = nice_step(n / 6.0).max(1.0);
    let mut x = 0.0;
    while x <= n + 1e-9 {
        s.push_str(&format!(
            "<line x1=\"{px:.1}\" x2=\"{px:.1}\" y1=\"{}\" y2=\"{}\" stroke=\"#333\"/>\n\
             <text x=\"{px:.1}\" y=\"{}\" text-anchor=\"middle\">{x}</text>\n",
            H - BOTTOM,
            H - BOTTOM + 5.0,
            H - BOTTOM + 18.0,
            px = px(x),
        ));
        x += xstep;
    }
    s.push_str(&format!(
        "<line x1=\"{LEFT}\" x2=\"{}\" y1=\"{}\" y2=\"{}\" stroke=\"#333\"/>\n\
         <line x1=\"{LEFT}\" x2=\"{LEFT}\" y1=\"{TOP}\" y2=\"{}\" stroke=\"#333\"/>\n\
         <text x=\"{}\" y=\"{}\" text-anchor=\"middle\">evaluations</text>\n\
         <text x=\"16\" y=\"{}\" text-anchor=\"middle\" transform=\"rotate(-90 16 {})\">{}{}</text>\n",
        W - RIGHT,
        H - BOTTOM,
        H - BOTTOM,
        H - BOTTOM,
        (LEFT + W - RIGHT) / 2.0,
        H - 12.0,
        (TOP + H - BOTTOM) / 2.0,
        (TOP + H - BOTTOM) / 2.0,
        escape(&cfg.objective.describe()),
        if percent { " (%)" } else { "" },
    ));
    for (i, r) in references.iter().enumerate() {
        let y = py(r.score * scale);
        s.push_str(&format!(
            "<line x1=\"{LEFT}\" x2=\"{}\" y1=\"{y:.1}\" y2=\"{y:.1}\" stroke=\"#d62728\" stroke-dasharray=\"6 4\"/>\n\
             <text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\" fill=\"#d62728\">{}</text>\n",
            W - RIGHT,
            W - RIGHT - 4.0,
            y - 5.0 - 14.0 * i as f64,
            escape(&r.label),
        ));
    }
    for e in evals {
        s.push_str(&format!(
            "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"2.5\" fill=\"#999\"/>\n",
            px(e.index as f64),
            py(e.score * scale)
        ));
    }
    let mut points = Vec::new();
    let mut last: Option<f64> = None;
    for e in evals {
        let y = py(e.best * scale);
        if let Some(prev) = last {
            points.push(format!("{:.1},{prev:.1}", px(e.index as f64)));
        }
        points.push(format!("{:.1},{y:.1}", px(e.index as f64)));
        last = Some(y);
    }
    s.push_str(&format!(
        "<polyline fill=\"none\" stroke=\"#1f77b4\" stroke-width=\"2\" points=\"{}\"/>\n",
        points.join(" ")
    ));
    if let Some(b) = evals.get(outcome.best) {
        s.push_str(&format!(
            "<text x=\"{LEFT}\" y=\"{}\" dx=\"6\" fill=\"#1f77b4\">best {} at evaluation {}</text>\n",
            TOP - 4.0,
            tick_label(b.score * scale, step / 10.0),
            b.index
        ));
    }
    s.push_str("</svg>\n");
    s
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// 1, 2 or 5 times a power of ten, at least `raw`.
fn nice_step(raw: f64) -> f64 {
    if !(raw.is_finite() && raw > 0.0) {
        return 1.0;
    }
    let p = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * p)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * p)
}

/// The range [lo, hi] widened to whole ticks, about five of them.
fn nice_range(lo: f64, hi: f64) -> (f64, f64, f64) {
    let step = nice_step((hi - lo) / 5.0);
    ((lo / step).floor() * step, (hi / step).ceil() * step, step)
}

fn tick_label(y: f64, step: f64) -> String {
    let decimals = if step >= 1.0 {
        0
    } else {
        (-step.log10()).ceil() as usize
    };
    format!("{y:.decimals$}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round_numbers() {
        assert_eq!(nice_step(0.7), 1.0);
        assert_eq!(nice_step(1.2), 2.0);
        assert_eq!(nice_step(3.0), 5.0);
        assert_eq!(nice_step(0.03), 0.05);
        assert_eq!(nice_range(61.3, 66.2), (61.0, 67.0, 1.0));
        assert_eq!(tick_label(65.0, 1.0), "65");
        assert_eq!(tick_label(0.25, 0.05), "0.25");
        assert_eq!(csv_cell("a,b"), "\"a,b\"");
        assert_eq!(escape("<&>"), "&lt;&amp;&gt;");
    }
}
