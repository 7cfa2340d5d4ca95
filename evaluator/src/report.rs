//! Reports: one model's per-task scores ([`EvalReport`]) and a comparison
//! of several models ([`CompareTable`], rows are methods and columns are
//! tasks plus the average, as FusionBench prints them), each rendered as a
//! markdown table, CSV or JSON.
//!
//! In tables, fractions (acc, acc_norm, exact_match) are printed in percent
//! with one decimal and perplexities with two decimals; CSV and JSON carry
//! the raw values (fractions in [0, 1]). The average is the mean of the
//! headline scores of the tasks whose headline metric is a fraction;
//! perplexity tasks are shown but not averaged (a lower-is-better, unbounded
//! number does not mix with accuracies).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::metrics;
use crate::runner::TaskResult;
use crate::taskpool::TaskKind;
use crate::views::ViewMemory;

/// Output format of a report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Format {
    /// A markdown table.
    #[default]
    Table,
    /// Comma-separated values with a header line.
    Csv,
    /// Pretty-printed JSON.
    Json,
}

impl FromStr for Format {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "table" | "markdown" | "md" => Ok(Format::Table),
            "csv" => Ok(Format::Csv),
            "json" => Ok(Format::Json),
            other => Err(format!(
                "unknown format `{other}` (expected table, csv or json)"
            )),
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Format::Table => "table",
            Format::Csv => "csv",
            Format::Json => "json",
        })
    }
}

/// The mean headline score of the tasks whose headline metric is a
/// fraction; `None` when there is none.
pub fn average(results: &[TaskResult]) -> Option<f64> {
    let scores: Vec<f64> = results
        .iter()
        .filter(|r| metrics::is_fraction(&r.metric))
        .map(|r| r.score)
        .collect();
    (!scores.is_empty()).then(|| scores.iter().sum::<f64>() / scores.len() as f64)
}

/// A value as a table shows it: percent for fractions, else two decimals.
pub fn display_value(metric: &str, value: f64) -> String {
    if metrics::is_fraction(metric) {
        format!("{:.1}", 100.0 * value)
    } else {
        format!("{value:.2}")
    }
}

/// One model's scores on a task pool.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    /// What was evaluated (a folder, a checkpoint name or a merge spec).
    pub model: String,
    /// The task pool's name.
    pub taskpool: String,
    /// Per-task results, in pool order.
    pub tasks: Vec<TaskResult>,
    /// See [`average`].
    pub average: Option<f64>,
}

impl EvalReport {
    /// A report over `tasks`, with its average.
    pub fn new(
        model: impl Into<String>,
        taskpool: impl Into<String>,
        tasks: Vec<TaskResult>,
    ) -> Self {
        let average = average(&tasks);
        EvalReport {
            model: model.into(),
            taskpool: taskpool.into(),
            tasks,
            average,
        }
    }

    /// Renders the report.
    pub fn render(&self, format: Format) -> String {
        match format {
            Format::Table => self.markdown(),
            Format::Csv => self.csv(),
            Format::Json => serde_json::to_string_pretty(self).expect("json") + "\n",
        }
    }

    fn markdown(&self) -> String {
        let mut rows: Vec<Vec<String>> = vec![vec![
            "task".into(),
            "kind".into(),
            "metric".into(),
            "score".into(),
            "samples".into(),
            "other metrics".into(),
        ]];
        for r in &self.tasks {
            let other: Vec<String> = r
                .metrics
                .iter()
                .filter(|(m, _)| **m != r.metric)
                .map(|(m, v)| format!("{m} {}", display_value(m, *v)))
                .collect();
            rows.push(vec![
                r.task.clone(),
                r.kind.to_string(),
                r.metric.clone(),
                display_value(&r.metric, r.score),
                format!("{}/{}", r.samples, r.total),
                other.join(", "),
            ]);
        }
        rows.push(vec![
            "average".into(),
            String::new(),
            String::new(),
            self.average
                .map_or("-".into(), |a| format!("{:.1}", 100.0 * a)),
            String::new(),
            String::new(),
        ]);
        let mut out = format!("model: {}  task pool: {}\n\n", self.model, self.taskpool);
        out.push_str(&markdown_table(
            &rows,
            &[false, false, false, true, true, false],
        ));
        out
    }

    fn csv(&self) -> String {
        let mut out = String::from("task,kind,metric,value,samples,total\n");
        for r in &self.tasks {
            let mut names: Vec<&String> = vec![&r.metric];
            names.extend(r.metrics.keys().filter(|m| **m != r.metric));
            for m in names {
                out.push_str(&csv_line(&[
                    r.task.clone(),
                    r.kind.to_string(),
                    m.clone(),
                    r.metrics[m].to_string(),
                    r.samples.to_string(),
                    r.total.to_string(),
                ]));
            }
        }
        if let Some(a) = self.average {
            out.push_str(&csv_line(&[
                "average".into(),
                String::new(),
                "mean".into(),
                a.to_string(),
                String::new(),
                String::new(),
            ]));
        }
        out
    }
}

/// A column of a comparison: one task and its headline metric.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Column {
    /// Task name.
    pub task: String,
    /// Task kind.
    pub kind: TaskKind,
    /// Headline metric.
    pub metric: String,
}

/// A row of a comparison: one model (base, expert, merge) and its results.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Row {
    /// The row label.
    pub name: String,
    /// The merge spec in compact form, for merged rows.
    pub spec: Option<String>,
    /// Per-task results, in column order.
    pub results: Vec<TaskResult>,
    /// See [`average`].
    pub average: Option<f64>,
    /// Seconds spent loading or merging the model.
    pub load_seconds: f64,
    /// A per-task retrieval merge held as masked views: what it costs
    /// resident.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<ViewMemory>,
}

impl Row {
    /// A row with its average.
    pub fn new(
        name: String,
        spec: Option<String>,
        results: Vec<TaskResult>,
        load_seconds: f64,
    ) -> Self {
        let average = average(&results);
        Row {
            name,
            spec,
            results,
            average,
            load_seconds,
            memory: None,
        }
    }
}

/// A FusionBench-style comparison: rows are models, columns are tasks plus
/// the average.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompareTable {
    /// The task pool's name.
    pub taskpool: String,
    /// The task columns.
    pub columns: Vec<Column>,
    /// The rows, in config order.
    pub rows: Vec<Row>,
}

impl CompareTable {
    /// Renders the table.
    pub fn render(&self, format: Format) -> String {
        match format {
            Format::Table => self.markdown(),
            Format::Csv => self.csv(),
            Format::Json => serde_json::to_string_pretty(self).expect("json") + "\n",
        }
    }

    fn score(&self, row: &Row, col: usize) -> Option<f64> {
        row.results
            .iter()
            .find(|r| r.task == self.columns[col].task)
            .map(|r| r.score)
    }

    /// The best score of each column (max, or min for lower-is-better
    /// metrics); `None` when every row has the same score.
    fn best(&self) -> Vec<Option<f64>> {
        (0..self.columns.len())
            .map(|c| {
                let hib = metrics::higher_is_better(&self.columns[c].metric);
                let values: Vec<f64> = self
                    .rows
                    .iter()
                    .filter_map(|r| self.score(r, c))
                    .filter(|v| !v.is_nan())
                    .collect();
                best_of(values, hib)
            })
            .collect()
    }

    fn markdown(&self) -> String {
        let mut header = vec!["method".to_string()];
        header.extend(self.columns.iter().map(|c| c.task.clone()));
        header.push("average".into());
        let mut rows = vec![header];
        let best = self.best();
        let best_avg = best_of(self.rows.iter().filter_map(|r| r.average).collect(), true);
        for row in &self.rows {
            let mut cells = vec![row.name.clone()];
            for (c, col) in self.columns.iter().enumerate() {
                cells.push(match self.score(row, c) {
                    None => "-".into(),
                    Some(v) => {
                        let s = display_value(&col.metric, v);
                        if Some(v) == best[c] {
                            format!("**{s}**")
                        } else {
                            s
                        }
                    }
                });
            }
            cells.push(match row.average {
                None => "-".into(),
                Some(a) if Some(a) == best_avg => {
                    format!("**{:.1}**", 100.0 * a)
                }
                Some(a) => format!("{:.1}", 100.0 * a),
            });
            rows.push(cells);
        }
        let mut right = vec![false];
        right.extend(std::iter::repeat_n(true, self.columns.len() + 1));
        let mut out = markdown_table(&rows, &right);
        let metrics: Vec<String> = self
            .columns
            .iter()
            .map(|c| {
                let unit = if metrics::is_fraction(&c.metric) {
                    " (×100)"
                } else {
                    ""
                };
                format!("{}: {}{unit}", c.task, c.metric)
            })
            .collect();
        for row in &self.rows {
            if let Some(m) = &row.memory {
                out.push_str(&format!(
                    "\n`{}`: each task scored with its own view; resident, one unified vector of {} \
                     and per task {} (mask bits and scales), against {} per task held dense.\n",
                    row.name,
                    human_bytes(m.unified_bytes),
                    human_bytes(m.view_bytes),
                    human_bytes(m.dense_bytes)
                ));
            }
        }
        out.push_str(&format!(
            "\nTask pool `{}`. Metrics: {}. Average: mean of the ×100 metrics (accuracies, correlations). Best of each column in bold (unless all tie).\n",
            self.taskpool,
            metrics.join(", ")
        ));
        out
    }

    fn csv(&self) -> String {
        let mut header = vec!["method".to_string()];
        header.extend(
            self.columns
                .iter()
                .map(|c| format!("{} ({})", c.task, c.metric)),
        );
        header.push("average".into());
        let mut out = csv_line(&header);
        for row in &self.rows {
            let mut cells = vec![row.name.clone()];
            for c in 0..self.columns.len() {
                cells.push(self.score(row, c).map_or(String::new(), |v| v.to_string()));
            }
            cells.push(row.average.map_or(String::new(), |v| v.to_string()));
            out.push_str(&csv_line(&cells));
        }
        out
    }
}

/// The largest (or, not `higher`, smallest) value; `None` when all are equal.
fn best_of(values: Vec<f64>, higher: bool) -> Option<f64> {
    if values.windows(2).all(|w| w[0] == w[1]) {
        return None;
    }
    values
        .into_iter()
        .reduce(|a, b| if (b > a) == higher { b } else { a })
}

/// A markdown table with padded columns; `right[i]` right-aligns column i.
fn markdown_table(rows: &[Vec<String>], right: &[bool]) -> String {
    let n = rows[0].len();
    let widths: Vec<usize> = (0..n)
        .map(|c| {
            rows.iter()
                .map(|r| r[c].chars().count())
                .max()
                .unwrap_or(0)
                .max(3)
        })
        .collect();
    let line = |cells: &[String]| -> String {
        let parts: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(c, s)| {
                let pad = widths[c] - s.chars().count();
                if right[c] {
                    format!("{}{s}", " ".repeat(pad))
                } else {
                    format!("{s}{}", " ".repeat(pad))
                }
            })
            .collect();
        format!("| {} |\n", parts.join(" | "))
    };
    let mut out = line(&rows[0]);
    let sep: Vec<String> = (0..n)
        .map(|c| {
            if right[c] {
                format!("{}:", "-".repeat(widths[c] - 1))
            } else {
                format!(":{}", "-".repeat(widths[c] - 1))
            }
        })
        .collect();
    out.push_str(&format!("| {} |\n", sep.join(" | ")));
    for r in &rows[1..] {
        out.push_str(&line(r));
    }
    out
}

/// One CSV line (RFC 4180 quoting where needed).
fn csv_line(cells: &[String]) -> String {
    let quoted: Vec<String> = cells
        .iter()
        .map(|c| {
            if c.contains([',', '"', '\n', '\r']) {
                format!("\"{}\"", c.replace('"', "\"\""))
            } else {
                c.clone()
            }
        })
        .collect();
    quoted.join(",") + "\n"
}

/// Bytes as `512 B`, `3.4 KiB`, `5.9 MiB`, `1.2 GiB`.
pub fn human_bytes(b: u64) -> String {
    let x = b as f64;
    if x < 1024.0 {
        format!("{b} B")
    } else if x < 1024.0 * 1024.0 {
        format!("{:.1} KiB", x / 1024.0)
    } else if x < 1024.0 * 1024.0 * 1024.0 {
        format!("{:.1} MiB", x / (1024.0 * 1024.0))
    } else {
        format!("{:.2} GiB", x / (1024.0 * 1024.0 * 1024.0))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn result(task: &str, kind: TaskKind, metrics: &[(&str, f64)]) -> TaskResult {
        TaskResult {
            task: task.into(),
            kind,
            metric: metrics[0].0.into(),
            score: metrics[0].1,
            metrics: metrics
                .iter()
                .map(|(m, v)| (m.to_string(), *v))
                .collect::<BTreeMap<_, _>>(),
            samples: 4,
            total: 10,
            seconds: 0.5,
        }
    }

    fn report() -> EvalReport {
        EvalReport::new(
            "models/base",
            "demo",
            vec![
                result(
                    "qa",
                    TaskKind::MultipleChoice,
                    &[("acc", 0.5), ("acc_norm", 0.75)],
                ),
                result("sums", TaskKind::Generate, &[("exact_match", 0.25)]),
                result(
                    "text",
                    TaskKind::Perplexity,
                    &[("perplexity", 3.0), ("bits_per_byte", 1.5)],
                ),
            ],
        )
    }

    #[test]
    fn average_skips_perplexity() {
        // (0.5 + 0.25) / 2; perplexity 3.0 is not a fraction.
        assert_eq!(report().average, Some(0.375));
        let only_ppl = EvalReport::new(
            "m",
            "p",
            vec![result("t", TaskKind::Perplexity, &[("perplexity", 2.0)])],
        );
        assert_eq!(only_ppl.average, None);
        assert!(only_ppl.render(Format::Table).contains("| average |"));
    }

    #[test]
    fn eval_report_formats() {
        let r = report();
        let md = r.render(Format::Table);
        let lines: Vec<&str> = md.lines().collect();
        assert_eq!(lines[0], "model: models/base  task pool: demo");
        assert!(
            lines[2].starts_with("| task ") && lines[3].starts_with("| :--"),
            "{md}"
        );
        assert!(md.contains("| qa      | multiple_choice | acc         |  50.0 |    4/10 | acc_norm 75.0      |"), "{md}");
        assert!(md.contains("| text    | perplexity      | perplexity  |  3.00 |    4/10 | bits_per_byte 1.50 |"), "{md}");
        assert!(
            md.contains("| average |                 |             |  37.5 |"),
            "{md}"
        );
        let csv = r.render(Format::Csv);
        assert_eq!(
            csv,
            "task,kind,metric,value,samples,total\n\
             qa,multiple_choice,acc,0.5,4,10\n\
             qa,multiple_choice,acc_norm,0.75,4,10\n\
             sums,generate,exact_match,0.25,4,10\n\
             text,perplexity,perplexity,3,4,10\n\
             text,perplexity,bits_per_byte,1.5,4,10\n\
             average,,mean,0.375,,\n"
        );
        let back: EvalReport = serde_json::from_str(&r.render(Format::Json)).unwrap();
        assert_eq!(back, r);
        let v: serde_json::Value = serde_json::from_str(&r.render(Format::Json)).unwrap();
        assert_eq!(v["tasks"][0]["kind"], "multiple_choice");
        assert_eq!(v["tasks"][2]["metrics"]["bits_per_byte"], 1.5);
    }

    #[test]
    fn compare_table_formats() {
        let columns = vec![
            Column {
                task: "qa".into(),
                kind: TaskKind::MultipleChoice,
                metric: "acc".into(),
            },
            Column {
                task: "text".into(),
                kind: TaskKind::Perplexity,
                metric: "perplexity".into(),
            },
        ];
        let rows = vec![
            Row::new(
                "base".into(),
                None,
                vec![
                    result("qa", TaskKind::MultipleChoice, &[("acc", 0.25)]),
                    result("text", TaskKind::Perplexity, &[("perplexity", 2.5)]),
                ],
                0.1,
            ),
            Row::new(
                "ta, λ=0.3".into(),
                Some("task_arithmetic(a,b;scaling_coefficient=0.3)".into()),
                vec![
                    result("qa", TaskKind::MultipleChoice, &[("acc", 0.5)]),
                    result("text", TaskKind::Perplexity, &[("perplexity", 4.0)]),
                ],
                0.2,
            ),
        ];
        let t = CompareTable {
            taskpool: "demo".into(),
            columns,
            rows,
        };
        let md = t.render(Format::Table);
        let lines: Vec<&str> = md.lines().collect();
        assert_eq!(lines[0], "| method    |       qa |     text |  average |");
        assert_eq!(lines[1], "| :-------- | -------: | -------: | -------: |");
        // Best accuracy is the max, best perplexity the min.
        assert_eq!(lines[2], "| base      |     25.0 | **2.50** |     25.0 |");
        assert_eq!(lines[3], "| ta, λ=0.3 | **50.0** |     4.00 | **50.0** |");
        assert!(md.contains("qa: acc (×100), text: perplexity"), "{md}");
        let csv = t.render(Format::Csv);
        assert_eq!(
            csv,
            "method,qa (acc),text (perplexity),average\nbase,0.25,2.5,0.25\n\"ta, λ=0.3\",0.5,4,0.5\n"
        );
        let back: CompareTable = serde_json::from_str(&t.render(Format::Json)).unwrap();
        assert_eq!(back, t);
    }

    #[test]
    fn a_column_where_all_rows_tie_has_no_bold() {
        let row = |name: &str, acc: f64| {
            Row::new(
                name.into(),
                None,
                vec![result("qa", TaskKind::MultipleChoice, &[("acc", acc)])],
                0.0,
            )
        };
        let columns = vec![Column {
            task: "qa".into(),
            kind: TaskKind::MultipleChoice,
            metric: "acc".into(),
        }];
        let t = CompareTable {
            taskpool: "p".into(),
            columns,
            rows: vec![row("x", 0.5), row("y", 0.5)],
        };
        assert!(!t.render(Format::Table).contains("**"));
        assert_eq!(best_of(vec![2.0, 1.0, 3.0], false), Some(1.0));
        assert_eq!(best_of(vec![2.0], true), None);
    }

    #[test]
    fn format_names() {
        assert_eq!("csv".parse::<Format>().unwrap(), Format::Csv);
        assert_eq!("markdown".parse::<Format>().unwrap(), Format::Table);
        assert!("xml"
            .parse::<Format>()
            .unwrap_err()
            .contains("table, csv or json"));
    }
}
