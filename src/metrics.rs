//! Prometheus metrics: the names (constants, in one place), a small registry of counters,
//! gauges and histograms, and its text exposition for `GET /metrics`.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;

/// HTTP requests by route and status code (counter; labels `route`, `status`).
pub const HTTP_REQUESTS: &str = "tiller_http_requests_total";
/// Requests waiting for a place in the batch (gauge).
pub const QUEUE_DEPTH: &str = "tiller_queue_depth";
/// Sequences in the running batch (gauge).
pub const ACTIVE_SEQUENCES: &str = "tiller_active_sequences";
/// Sequences per forward pass (histogram).
pub const BATCH_SIZE: &str = "tiller_batch_size";
/// Rows (tokens) per forward pass (histogram).
pub const BATCH_TOKENS: &str = "tiller_batch_tokens";
/// Duration of one forward pass with sampling (histogram, seconds).
pub const STEP_SECONDS: &str = "tiller_step_seconds";
/// Admission to first generated token (histogram, seconds).
pub const TIME_TO_FIRST_TOKEN: &str = "tiller_time_to_first_token_seconds";
/// Between consecutive tokens of one sequence (histogram, seconds).
pub const INTER_TOKEN_LATENCY: &str = "tiller_inter_token_latency_seconds";
/// Prompt tokens run (counter).
pub const PROMPT_TOKENS: &str = "tiller_prompt_tokens_total";
/// Tokens generated (counter).
pub const GENERATED_TOKENS: &str = "tiller_generated_tokens_total";
/// Steering interventions applied to a row at a hook point, by op (counter; label `op`).
pub const INTERVENTIONS: &str = "tiller_steering_interventions_total";
/// Sequences finished, by reason (counter; label `reason`).
pub const FINISHED: &str = "tiller_sequences_finished_total";
/// Requests refused before running, by reason (counter; label `reason`).
pub const REJECTED: &str = "tiller_requests_rejected_total";
/// Open HTTP connections (gauge).
pub const OPEN_CONNECTIONS: &str = "tiller_open_connections";
/// Gauge: 1 while the shared vector database is reachable (`store.url` set), else 0.
pub const STORE_CONNECTED: &str = "tiller_store_connected";

/// Help text of each metric.
const HELP: &[(&str, &str, &str)] = &[
    (
        HTTP_REQUESTS,
        "counter",
        "HTTP requests by route and status",
    ),
    (
        QUEUE_DEPTH,
        "gauge",
        "Requests waiting for a place in the batch",
    ),
    (ACTIVE_SEQUENCES, "gauge", "Sequences in the running batch"),
    (BATCH_SIZE, "histogram", "Sequences per forward pass"),
    (BATCH_TOKENS, "histogram", "Tokens per forward pass"),
    (STEP_SECONDS, "histogram", "Seconds per forward pass"),
    (
        TIME_TO_FIRST_TOKEN,
        "histogram",
        "Seconds from admission to the first generated token",
    ),
    (
        INTER_TOKEN_LATENCY,
        "histogram",
        "Seconds between consecutive tokens of a sequence",
    ),
    (PROMPT_TOKENS, "counter", "Prompt tokens run"),
    (GENERATED_TOKENS, "counter", "Tokens generated"),
    (
        INTERVENTIONS,
        "counter",
        "Steering interventions applied to a row at a hook point, by op",
    ),
    (FINISHED, "counter", "Sequences finished, by reason"),
    (
        REJECTED,
        "counter",
        "Requests refused before running, by reason",
    ),
    (OPEN_CONNECTIONS, "gauge", "Open HTTP connections"),
    (
        STORE_CONNECTED,
        "gauge",
        "1 while the shared vector database is reachable",
    ),
];

const SECONDS_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
const COUNT_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
];

type Labels = Vec<(&'static str, String)>;

#[derive(Debug, Clone)]
struct Histogram {
    buckets: &'static [f64],
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

#[derive(Debug, Default)]
struct Inner {
    counters: BTreeMap<(&'static str, Labels), f64>,
    gauges: BTreeMap<&'static str, f64>,
    histograms: BTreeMap<&'static str, Histogram>,
}

/// The registry.
#[derive(Debug, Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
}

fn buckets_for(name: &str) -> &'static [f64] {
    if name.ends_with("_seconds") {
        SECONDS_BUCKETS
    } else {
        COUNT_BUCKETS
    }
}

impl Metrics {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn add(&self, name: &'static str, labels: &[(&'static str, &str)], by: f64) {
        let labels: Labels = labels.iter().map(|(k, v)| (*k, v.to_string())).collect();
        *self.lock().counters.entry((name, labels)).or_default() += by;
    }

    pub fn set(&self, name: &'static str, value: f64) {
        self.lock().gauges.insert(name, value);
    }

    pub fn observe(&self, name: &'static str, value: f64) {
        let mut inner = self.lock();
        let h = inner.histograms.entry(name).or_insert_with(|| {
            let buckets = buckets_for(name);
            Histogram {
                buckets,
                counts: vec![0; buckets.len()],
                sum: 0.0,
                count: 0,
            }
        });
        for (b, c) in h.buckets.iter().zip(h.counts.iter_mut()) {
            if value <= *b {
                *c += 1;
            }
        }
        h.sum += value;
        h.count += 1;
    }

    /// A counter's current value (tests and logs).
    pub fn counter(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let inner = self.lock();
        inner
            .counters
            .iter()
            .filter(|((n, l), _)| {
                *n == name
                    && labels
                        .iter()
                        .all(|(k, v)| l.iter().any(|(lk, lv)| lk == k && lv == v))
            })
            .map(|(_, v)| v)
            .sum()
    }

    /// The Prometheus text exposition format.
    pub fn render(&self) -> String {
        let inner = self.lock();
        let mut out = String::new();
        for (name, kind, help) in HELP {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            match *kind {
                "counter" => {
                    let mut any = false;
                    for ((n, labels), v) in &inner.counters {
                        if n == name {
                            any = true;
                            let _ = writeln!(out, "{name}{} {v}", fmt_labels(labels, None));
                        }
                    }
                    if !any {
                        let _ = writeln!(out, "{name} 0");
                    }
                }
                "gauge" => {
                    let _ = writeln!(
                        out,
                        "{name} {}",
                        inner.gauges.get(name).copied().unwrap_or(0.0)
                    );
                }
                _ => {
                    let empty;
                    let h = match inner.histograms.get(name) {
                        Some(h) => h,
                        None => {
                            let b = buckets_for(name);
                            empty = Histogram {
                                buckets: b,
                                counts: vec![0; b.len()],
                                sum: 0.0,
                                count: 0,
                            };
                            &empty
                        }
                    };
                    for (b, c) in h.buckets.iter().zip(&h.counts) {
                        let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {c}");
                    }
                    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", h.count);
                    let _ = writeln!(out, "{name}_sum {}", h.sum);
                    let _ = writeln!(out, "{name}_count {}", h.count);
                }
            }
        }
        out
    }
}

fn fmt_labels(labels: &Labels, extra: Option<(&str, &str)>) -> String {
    let mut parts: Vec<String> = labels
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\"")))
        .collect();
    if let Some((k, v)) = extra {
        parts.push(format!("{k}=\"{v}\""));
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!("{{{}}}", parts.join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_gauges_and_histograms() {
        let m = Metrics::default();
        m.add(
            HTTP_REQUESTS,
            &[("route", "/generate"), ("status", "200")],
            1.0,
        );
        m.add(
            HTTP_REQUESTS,
            &[("route", "/generate"), ("status", "200")],
            1.0,
        );
        m.set(QUEUE_DEPTH, 3.0);
        m.observe(TIME_TO_FIRST_TOKEN, 0.03);
        m.observe(TIME_TO_FIRST_TOKEN, 0.3);
        let text = m.render();
        assert!(
            text.contains("tiller_http_requests_total{route=\"/generate\",status=\"200\"} 2"),
            "{text}"
        );
        assert!(text.contains("tiller_queue_depth 3"));
        assert!(text.contains("tiller_time_to_first_token_seconds_bucket{le=\"0.05\"} 1"));
        assert!(text.contains("tiller_time_to_first_token_seconds_bucket{le=\"+Inf\"} 2"));
        assert!(text.contains("tiller_time_to_first_token_seconds_count 2"));
        assert!(text.contains("# TYPE tiller_steering_interventions_total counter"));
        assert_eq!(m.counter(HTTP_REQUESTS, &[("status", "200")]), 2.0);
    }
}
