//! Every Prometheus metric of the gateway: names as constants, registered in
//! one function ([`Metrics::new`]), rendered in the text exposition format.
//!
//! Counters end in `_total`, durations are in seconds and sizes in bytes, so
//! `promtool check metrics` accepts the exposition.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// HTTP requests by route pattern and status code.
pub const HTTP_REQUESTS_TOTAL: &str = "fusion_http_requests_total";
/// HTTP request latency by route pattern.
pub const HTTP_REQUEST_DURATION_SECONDS: &str = "fusion_http_request_duration_seconds";
/// Time from the start of a generation to its first token.
pub const TIME_TO_FIRST_TOKEN_SECONDS: &str = "fusion_time_to_first_token_seconds";
/// Tokens generated, all requests together.
pub const GENERATED_TOKENS_TOTAL: &str = "fusion_generated_tokens_total";
/// Wall time of merges by method.
pub const MERGE_DURATION_SECONDS: &str = "fusion_merge_duration_seconds";
/// Wall time of router training (routed merges that train), by method.
pub const ROUTER_TRAINING_SECONDS: &str = "fusion_router_training_seconds";
/// Seconds of forward/backward passes on calibration inputs in
/// data-driven merges (`fisher_merging`, `regmean`, ...), by method.
pub const MERGE_CALIBRATION_SECONDS: &str = "fusion_merge_calibration_seconds";
/// Statistics (Fisher diagonals, Gram matrices) found in the statistics
/// cache.
pub const STATS_CACHE_HITS_TOTAL: &str = "fusion_stats_cache_hits_total";
/// Statistics computed (not in the statistics cache).
pub const STATS_CACHE_MISSES_TOTAL: &str = "fusion_stats_cache_misses_total";
/// Statistics removed from the cache to fit `cache.max_stats_bytes`.
pub const STATS_CACHE_EVICTIONS_TOTAL: &str = "fusion_stats_cache_evictions_total";
/// Bytes of the statistics cache on disk.
pub const STATS_CACHE_BYTES: &str = "fusion_stats_cache_bytes";
/// Seconds of calibration forward passes the statistics cache's hits
/// saved (what computing them took).
pub const STATS_CACHE_SAVED_SECONDS_TOTAL: &str = "fusion_stats_cache_saved_seconds_total";
/// Merges run, by method and outcome (`success`, `error`).
pub const MERGES_TOTAL: &str = "fusion_merges_total";
/// Requests answered from a resident merge.
pub const MERGE_CACHE_HITS_TOTAL: &str = "fusion_merge_cache_hits_total";
/// Requests that started a merge (or a checkpoint load).
pub const MERGE_CACHE_MISSES_TOTAL: &str = "fusion_merge_cache_misses_total";
/// Requests that waited for a merge another request had started.
pub const MERGE_CACHE_JOINS_TOTAL: &str = "fusion_merge_cache_joins_total";
/// Entries removed from the cache, by cause (`size`, `explicit`, `expired`).
pub const MERGE_CACHE_EVICTIONS_TOTAL: &str = "fusion_merge_cache_evictions_total";
/// Bytes of resident models in the cache.
pub const MERGE_CACHE_BYTES: &str = "fusion_merge_cache_bytes";
/// Resident models in the cache.
pub const MERGE_CACHE_ENTRIES: &str = "fusion_merge_cache_entries";
/// Generation requests waiting for a slot.
pub const GENERATION_QUEUE_DEPTH: &str = "fusion_generation_queue_depth";
/// Generations running.
pub const GENERATIONS_RUNNING: &str = "fusion_generations_running";
/// Sequences in one batched forward pass (continuous batching's steps).
pub const BATCH_SEQUENCES: &str = "fusion_batch_sequences";
/// Tokens in one batched forward pass (decodes and prefill chunks).
pub const BATCH_TOKENS: &str = "fusion_batch_tokens";
/// Wall time of one batched step (forward pass and sampling).
pub const BATCH_STEP_SECONDS: &str = "fusion_batch_step_seconds";
/// Time a generation waited before joining the running batch.
pub const GENERATION_QUEUE_SECONDS: &str = "fusion_generation_queue_seconds";
/// Time between two tokens of one generation.
pub const INTER_TOKEN_SECONDS: &str = "fusion_inter_token_seconds";
/// Bytes of key/value cache blocks held by running sequences.
pub const KV_CACHE_BYTES: &str = "fusion_kv_cache_bytes";
/// Latest score of a scheduled evaluation, by merge, task and metric.
pub const EVAL_SCORE: &str = "fusion_eval_score";
/// Evaluation runs by merge and outcome.
pub const EVAL_RUNS_TOTAL: &str = "fusion_eval_runs_total";
/// Wall time of evaluation runs, by merge.
pub const EVAL_DURATION_SECONDS: &str = "fusion_eval_duration_seconds";
/// Unix time of the last successful evaluation run, by merge.
pub const EVAL_LAST_SUCCESS_TIMESTAMP_SECONDS: &str = "fusion_eval_last_success_timestamp_seconds";
/// 1 while a scheduled evaluation's merge scores under its `min_score`.
pub const EVAL_DEGRADED: &str = "fusion_eval_degraded";

/// Latency buckets of HTTP requests and first tokens (seconds).
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];
/// Buckets of counts per batched step (sequences, tokens).
const COUNT_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0,
];
/// Buckets of merges and evaluations (seconds).
const LONG_BUCKETS: &[f64] = &[
    0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];

/// The gateway's metrics, in their own registry (so several servers can run
/// in one process, as the tests do).
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// See [`HTTP_REQUESTS_TOTAL`].
    pub http_requests: IntCounterVec,
    /// See [`HTTP_REQUEST_DURATION_SECONDS`].
    pub http_duration: HistogramVec,
    /// See [`TIME_TO_FIRST_TOKEN_SECONDS`].
    pub time_to_first_token: Histogram,
    /// See [`GENERATED_TOKENS_TOTAL`].
    pub generated_tokens: IntCounter,
    /// See [`MERGE_DURATION_SECONDS`].
    pub merge_duration: HistogramVec,
    /// See [`ROUTER_TRAINING_SECONDS`].
    pub router_training: HistogramVec,
    /// See [`MERGE_CALIBRATION_SECONDS`].
    pub calibration: HistogramVec,
    /// See [`STATS_CACHE_HITS_TOTAL`].
    pub stats_hits: IntCounter,
    /// See [`STATS_CACHE_MISSES_TOTAL`].
    pub stats_misses: IntCounter,
    /// See [`STATS_CACHE_EVICTIONS_TOTAL`].
    pub stats_evictions: IntCounter,
    /// See [`STATS_CACHE_BYTES`].
    pub stats_bytes: IntGauge,
    /// See [`STATS_CACHE_SAVED_SECONDS_TOTAL`].
    pub stats_saved: prometheus::Counter,
    /// See [`MERGES_TOTAL`].
    pub merges: IntCounterVec,
    /// See [`MERGE_CACHE_HITS_TOTAL`].
    pub cache_hits: IntCounter,
    /// See [`MERGE_CACHE_MISSES_TOTAL`].
    pub cache_misses: IntCounter,
    /// See [`MERGE_CACHE_JOINS_TOTAL`].
    pub cache_joins: IntCounter,
    /// See [`MERGE_CACHE_EVICTIONS_TOTAL`].
    pub cache_evictions: IntCounterVec,
    /// See [`MERGE_CACHE_BYTES`].
    pub cache_bytes: IntGauge,
    /// See [`MERGE_CACHE_ENTRIES`].
    pub cache_entries: IntGauge,
    /// See [`GENERATION_QUEUE_DEPTH`].
    pub queue_depth: IntGauge,
    /// See [`GENERATIONS_RUNNING`].
    pub generations_running: IntGauge,
    /// See [`BATCH_SEQUENCES`].
    pub batch_sequences: Histogram,
    /// See [`BATCH_TOKENS`].
    pub batch_tokens: Histogram,
    /// See [`BATCH_STEP_SECONDS`].
    pub batch_step: Histogram,
    /// See [`GENERATION_QUEUE_SECONDS`].
    pub queue_seconds: Histogram,
    /// See [`INTER_TOKEN_SECONDS`].
    pub inter_token: Histogram,
    /// See [`KV_CACHE_BYTES`].
    pub kv_cache_bytes: IntGauge,
    /// See [`EVAL_SCORE`].
    pub eval_score: prometheus::GaugeVec,
    /// See [`EVAL_RUNS_TOTAL`].
    pub eval_runs: IntCounterVec,
    /// See [`EVAL_DURATION_SECONDS`].
    pub eval_duration: HistogramVec,
    /// See [`EVAL_LAST_SUCCESS_TIMESTAMP_SECONDS`].
    pub eval_last_success: IntGaugeVec,
    /// See [`EVAL_DEGRADED`].
    pub eval_degraded: IntGaugeVec,
}

fn opts(name: &str, help: &str) -> Opts {
    Opts::new(name, help)
}

fn hist(name: &str, help: &str, buckets: &[f64]) -> HistogramOpts {
    HistogramOpts::new(name, help).buckets(buckets.to_vec())
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        let registry = Registry::new();
        let http_requests = IntCounterVec::new(
            opts(HTTP_REQUESTS_TOTAL, "HTTP requests by route and status."),
            &["route", "status"],
        )
        .expect("valid metric");
        let http_duration = HistogramVec::new(
            hist(
                HTTP_REQUEST_DURATION_SECONDS,
                "HTTP request latency by route, until the response head (streams: first byte).",
                LATENCY_BUCKETS,
            ),
            &["route"],
        )
        .expect("valid metric");
        let time_to_first_token = Histogram::with_opts(hist(
            TIME_TO_FIRST_TOKEN_SECONDS,
            "Time from a generation's admission (batched: its submission) to its first token.",
            LATENCY_BUCKETS,
        ))
        .expect("valid metric");
        let generated_tokens = IntCounter::with_opts(opts(
            GENERATED_TOKENS_TOTAL,
            "Tokens generated by completions and chat completions.",
        ))
        .expect("valid metric");
        let merge_duration = HistogramVec::new(
            hist(
                MERGE_DURATION_SECONDS,
                "Wall time of merges by method.",
                LONG_BUCKETS,
            ),
            &["method"],
        )
        .expect("valid metric");
        let router_training = HistogramVec::new(
            hist(
                ROUTER_TRAINING_SECONDS,
                "Wall time of router training in routed merges (we_moe, ...), by method.",
                LONG_BUCKETS,
            ),
            &["method"],
        )
        .expect("valid metric");
        let calibration = HistogramVec::new(
            hist(
                MERGE_CALIBRATION_SECONDS,
                "Seconds of forward passes on calibration inputs in data-driven merges, by method.",
                LONG_BUCKETS,
            ),
            &["method"],
        )
        .expect("valid metric");
        let stats_hits = IntCounter::with_opts(opts(
            STATS_CACHE_HITS_TOTAL,
            "Calibration statistics (Fisher diagonals, Gram matrices) found in the statistics cache.",
        ))
        .expect("valid metric");
        let stats_misses = IntCounter::with_opts(opts(
            STATS_CACHE_MISSES_TOTAL,
            "Calibration statistics computed (not in the statistics cache).",
        ))
        .expect("valid metric");
        let stats_evictions = IntCounter::with_opts(opts(
            STATS_CACHE_EVICTIONS_TOTAL,
            "Calibration statistics removed to fit cache.max_stats_bytes.",
        ))
        .expect("valid metric");
        let stats_bytes = IntGauge::with_opts(opts(
            STATS_CACHE_BYTES,
            "Bytes of the statistics cache on disk.",
        ))
        .expect("valid metric");
        let stats_saved = prometheus::Counter::with_opts(opts(
            STATS_CACHE_SAVED_SECONDS_TOTAL,
            "Seconds of calibration forward passes saved by statistics-cache hits.",
        ))
        .expect("valid metric");
        let merges = IntCounterVec::new(
            opts(MERGES_TOTAL, "Merges run, by method and outcome."),
            &["method", "outcome"],
        )
        .expect("valid metric");
        let cache_hits = IntCounter::with_opts(opts(
            MERGE_CACHE_HITS_TOTAL,
            "Requests served from a resident model.",
        ))
        .expect("valid metric");
        let cache_misses = IntCounter::with_opts(opts(
            MERGE_CACHE_MISSES_TOTAL,
            "Requests that started a merge or a checkpoint load.",
        ))
        .expect("valid metric");
        let cache_joins = IntCounter::with_opts(opts(
            MERGE_CACHE_JOINS_TOTAL,
            "Requests that waited for a merge started by another request.",
        ))
        .expect("valid metric");
        let cache_evictions = IntCounterVec::new(
            opts(
                MERGE_CACHE_EVICTIONS_TOTAL,
                "Models removed from the cache, by cause (size, explicit, expired).",
            ),
            &["cause"],
        )
        .expect("valid metric");
        let cache_bytes = IntGauge::with_opts(opts(
            MERGE_CACHE_BYTES,
            "Bytes of the resident models in the cache.",
        ))
        .expect("valid metric");
        let cache_entries =
            IntGauge::with_opts(opts(MERGE_CACHE_ENTRIES, "Resident models in the cache."))
                .expect("valid metric");
        let queue_depth = IntGauge::with_opts(opts(
            GENERATION_QUEUE_DEPTH,
            "Generation requests waiting for a slot.",
        ))
        .expect("valid metric");
        let generations_running =
            IntGauge::with_opts(opts(GENERATIONS_RUNNING, "Generations running."))
                .expect("valid metric");
        let h = |name: &str, help: &str, buckets: &[f64]| {
            Histogram::with_opts(hist(name, help, buckets)).expect("valid metric")
        };
        let batch_sequences = h(
            BATCH_SEQUENCES,
            "Sequences in one batched forward pass.",
            COUNT_BUCKETS,
        );
        let batch_tokens = h(
            BATCH_TOKENS,
            "Tokens in one batched forward pass (decodes and prefill chunks).",
            COUNT_BUCKETS,
        );
        let batch_step = h(
            BATCH_STEP_SECONDS,
            "Wall time of one batched step (forward pass and sampling).",
            LATENCY_BUCKETS,
        );
        let queue_seconds = h(
            GENERATION_QUEUE_SECONDS,
            "Time a generation waited before joining the running batch.",
            LATENCY_BUCKETS,
        );
        let inter_token = h(
            INTER_TOKEN_SECONDS,
            "Time between two tokens of one generation.",
            LATENCY_BUCKETS,
        );
        let kv_cache_bytes = IntGauge::with_opts(opts(
            KV_CACHE_BYTES,
            "Bytes of key/value cache blocks held by running sequences.",
        ))
        .expect("valid metric");
        let eval_score = prometheus::GaugeVec::new(
            opts(EVAL_SCORE, "Latest score of a scheduled evaluation."),
            &["merge", "task", "metric"],
        )
        .expect("valid metric");
        let eval_runs = IntCounterVec::new(
            opts(EVAL_RUNS_TOTAL, "Evaluation runs by merge and outcome."),
            &["merge", "outcome"],
        )
        .expect("valid metric");
        let eval_duration = HistogramVec::new(
            hist(
                EVAL_DURATION_SECONDS,
                "Wall time of evaluation runs.",
                LONG_BUCKETS,
            ),
            &["merge"],
        )
        .expect("valid metric");
        let eval_last_success = IntGaugeVec::new(
            opts(
                EVAL_LAST_SUCCESS_TIMESTAMP_SECONDS,
                "Unix time of the last successful evaluation run.",
            ),
            &["merge"],
        )
        .expect("valid metric");
        let eval_degraded = IntGaugeVec::new(
            opts(
                EVAL_DEGRADED,
                "1 while an evaluation scores under its min_score, else 0.",
            ),
            &["merge"],
        )
        .expect("valid metric");
        let m = Metrics {
            registry,
            http_requests,
            http_duration,
            time_to_first_token,
            generated_tokens,
            merge_duration,
            router_training,
            calibration,
            stats_hits,
            stats_misses,
            stats_evictions,
            stats_bytes,
            stats_saved,
            merges,
            cache_hits,
            cache_misses,
            cache_joins,
            cache_evictions,
            cache_bytes,
            cache_entries,
            queue_depth,
            generations_running,
            batch_sequences,
            batch_tokens,
            batch_step,
            queue_seconds,
            inter_token,
            kv_cache_bytes,
            eval_score,
            eval_runs,
            eval_duration,
            eval_last_success,
            eval_degraded,
        };
        let collectors: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(m.http_requests.clone()),
            Box::new(m.http_duration.clone()),
            Box::new(m.time_to_first_token.clone()),
            Box::new(m.generated_tokens.clone()),
            Box::new(m.merge_duration.clone()),
            Box::new(m.router_training.clone()),
            Box::new(m.calibration.clone()),
            Box::new(m.stats_hits.clone()),
            Box::new(m.stats_misses.clone()),
            Box::new(m.stats_evictions.clone()),
            Box::new(m.stats_bytes.clone()),
            Box::new(m.stats_saved.clone()),
            Box::new(m.merges.clone()),
            Box::new(m.cache_hits.clone()),
            Box::new(m.cache_misses.clone()),
            Box::new(m.cache_joins.clone()),
            Box::new(m.cache_evictions.clone()),
            Box::new(m.cache_bytes.clone()),
            Box::new(m.cache_entries.clone()),
            Box::new(m.queue_depth.clone()),
            Box::new(m.generations_running.clone()),
            Box::new(m.batch_sequences.clone()),
            Box::new(m.batch_tokens.clone()),
            Box::new(m.batch_step.clone()),
            Box::new(m.queue_seconds.clone()),
            Box::new(m.inter_token.clone()),
            Box::new(m.kv_cache_bytes.clone()),
            Box::new(m.eval_score.clone()),
            Box::new(m.eval_runs.clone()),
            Box::new(m.eval_duration.clone()),
            Box::new(m.eval_last_success.clone()),
            Box::new(m.eval_degraded.clone()),
        ];
        for c in collectors {
            m.registry.register(c).expect("metric names are unique");
        }
        m
    }

    /// Records a data-driven merge: its seconds on calibration inputs, its
    /// statistics-cache hits and misses, and the cache's evictions, bytes
    /// and saved seconds (`counters`, shared by every merge).
    pub fn observe_data_driven(
        &self,
        method: &str,
        report: &merger::data_driven::DataReport,
        counters: &merger::data_driven::StatsCounters,
    ) {
        use std::sync::atomic::Ordering::Relaxed;
        if report.forward_batches > 0 {
            self.calibration
                .with_label_values(&[method])
                .observe(report.calibration_seconds);
        }
        self.stats_hits.inc_by(report.stats_hits);
        self.stats_misses.inc_by(report.stats_misses);
        let evictions = counters.evictions.load(Relaxed);
        let seen = self.stats_evictions.get();
        if evictions > seen {
            self.stats_evictions.inc_by(evictions - seen);
        }
        self.stats_bytes
            .set(i64::try_from(counters.bytes.load(Relaxed)).unwrap_or(i64::MAX));
        let saved = counters.saved_seconds_micros.load(Relaxed) as f64 / 1e6;
        if saved > self.stats_saved.get() {
            self.stats_saved.inc_by(saved - self.stats_saved.get());
        }
    }

    /// The registry, for collectors added by other parts (evaluations).
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding of gathered metrics");
        String::from_utf8(buf).expect("the text format is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_labels() {
        let m = Metrics::new();
        m.merges
            .with_label_values(&["ties_merging", "success"])
            .inc();
        m.merges
            .with_label_values(&["ties_merging", "success"])
            .inc();
        m.cache_hits.inc_by(3);
        m.cache_bytes.set(1024);
        let text = m.render();
        assert!(
            text.contains("fusion_merges_total{method=\"ties_merging\",outcome=\"success\"} 2"),
            "{text}"
        );
        assert!(text.contains("fusion_merge_cache_hits_total 3"), "{text}");
        assert!(text.contains("fusion_merge_cache_bytes 1024"), "{text}");
        assert!(text.contains("# TYPE fusion_merge_cache_misses_total counter"));
    }
}
