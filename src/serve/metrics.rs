//! Prometheus text-format metrics, kept and written by hand.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;

/// A fixed-bucket histogram (counts per bucket are not cumulative here; rendering sums them).
#[derive(Debug, Clone)]
struct Hist {
    bounds: Vec<f64>,
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Hist {
    fn new(bounds: Vec<f64>) -> Self {
        let n = bounds.len();
        Hist {
            bounds,
            counts: vec![0; n],
            sum: 0.0,
            count: 0,
        }
    }

    fn observe(&mut self, v: f64) {
        if let Some(i) = self.bounds.iter().position(|b| v <= *b) {
            self.counts[i] += 1;
        }
        self.sum += v;
        self.count += 1;
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cum = 0;
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            cum += c;
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {cum}");
        }
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}",
            self.count
        );
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(out, "{name}_sum{braces} {}", self.sum);
        let _ = writeln!(out, "{name}_count{braces} {}", self.count);
    }
}

const LATENCY_BOUNDS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
const BATCH_BOUNDS: [f64; 8] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0];

#[derive(Debug)]
struct Inner {
    requests: BTreeMap<(String, u16), u64>,
    latency: BTreeMap<String, Hist>,
    batch: Hist,
    /// Exit layer per stream: image, text, decoder (one observation per generated token).
    exits: [Hist; 3],
    /// Requests dropped by the worker before compute, by reason (expired, cancelled).
    dropped: BTreeMap<&'static str, u64>,
    /// Requests refused at admission, by reason (queue_full, wait, shutting_down).
    rejected: BTreeMap<&'static str, u64>,
    worker_panics: u64,
    /// Multiply-adds executed and at full depth, per task.
    macs: BTreeMap<&'static str, (u64, u64)>,
}

/// Server metrics: request counts by route and status, latency, batch sizes, exit layers.
#[derive(Debug)]
pub struct Metrics {
    inner: Mutex<Inner>,
}

impl Metrics {
    /// `max_layers`: the deepest stack of the model (bounds the exit-layer buckets).
    pub fn new(max_layers: usize) -> Self {
        let layer_bounds: Vec<f64> = (1..=max_layers.max(1)).map(|l| l as f64).collect();
        Metrics {
            inner: Mutex::new(Inner {
                requests: BTreeMap::new(),
                latency: BTreeMap::new(),
                batch: Hist::new(BATCH_BOUNDS.to_vec()),
                exits: [
                    Hist::new(layer_bounds.clone()),
                    Hist::new(layer_bounds.clone()),
                    Hist::new(layer_bounds),
                ],
                dropped: BTreeMap::new(),
                rejected: BTreeMap::new(),
                worker_panics: 0,
                macs: BTreeMap::new(),
            }),
        }
    }

    pub fn observe_request(&self, route: &str, status: u16, seconds: f64) {
        let mut g = self.inner.lock().unwrap();
        *g.requests.entry((route.to_string(), status)).or_insert(0) += 1;
        g.latency
            .entry(route.to_string())
            .or_insert_with(|| Hist::new(LATENCY_BOUNDS.to_vec()))
            .observe(seconds);
    }

    pub fn observe_batch(&self, size: usize) {
        self.inner.lock().unwrap().batch.observe(size as f64);
    }

    pub fn observe_exits(&self, exits: &crate::generate::Exits) {
        let mut g = self.inner.lock().unwrap();
        g.exits[0].observe(exits.image_layer as f64);
        g.exits[1].observe(exits.text_layer as f64);
        for &t in &exits.token_layers {
            g.exits[2].observe(t as f64);
        }
    }

    pub fn observe_dropped(&self, reason: &'static str) {
        *self
            .inner
            .lock()
            .unwrap()
            .dropped
            .entry(reason)
            .or_insert(0) += 1;
    }

    pub fn observe_rejected(&self, reason: &'static str) {
        *self
            .inner
            .lock()
            .unwrap()
            .rejected
            .entry(reason)
            .or_insert(0) += 1;
    }

    pub fn observe_panic(&self) {
        self.inner.lock().unwrap().worker_panics += 1;
    }

    pub fn observe_macs(&self, task: &'static str, executed: u64, full: u64) {
        let mut g = self.inner.lock().unwrap();
        let e = g.macs.entry(task).or_insert((0, 0));
        e.0 += executed;
        e.1 += full;
    }

    /// The Prometheus exposition text.
    pub fn render(&self, queue_depth: usize, queue_capacity: usize) -> String {
        let g = self.inner.lock().unwrap();
        let mut out = String::new();
        out.push_str("# HELP mue_requests_total HTTP requests by route and status.\n");
        out.push_str("# TYPE mue_requests_total counter\n");
        for ((route, status), n) in &g.requests {
            let _ = writeln!(
                out,
                "mue_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}"
            );
        }
        out.push_str("# HELP mue_request_duration_seconds Request latency.\n");
        out.push_str("# TYPE mue_request_duration_seconds histogram\n");
        for (route, h) in &g.latency {
            h.render(
                &mut out,
                "mue_request_duration_seconds",
                &format!("route=\"{route}\""),
            );
        }
        out.push_str("# HELP mue_batch_size Requests per engine call.\n");
        out.push_str("# TYPE mue_batch_size histogram\n");
        g.batch.render(&mut out, "mue_batch_size", "");
        out.push_str(
            "# HELP mue_exit_layer Layers run before exiting, per stream (decoder: per token).\n",
        );
        out.push_str("# TYPE mue_exit_layer histogram\n");
        for (name, h) in ["image", "text", "decoder"].iter().zip(&g.exits) {
            h.render(&mut out, "mue_exit_layer", &format!("stream=\"{name}\""));
        }
        out.push_str(
            "# HELP mue_requests_dropped_total Queued requests dropped before compute, by reason.\n",
        );
        out.push_str("# TYPE mue_requests_dropped_total counter\n");
        for reason in ["expired", "cancelled"] {
            let n = g.dropped.get(reason).copied().unwrap_or(0);
            let _ = writeln!(out, "mue_requests_dropped_total{{reason=\"{reason}\"}} {n}");
        }
        out.push_str(
            "# HELP mue_requests_rejected_total Requests refused with 503 before reading the body.\n",
        );
        out.push_str("# TYPE mue_requests_rejected_total counter\n");
        for reason in ["queue_full", "wait", "shutting_down"] {
            let n = g.rejected.get(reason).copied().unwrap_or(0);
            let _ = writeln!(
                out,
                "mue_requests_rejected_total{{reason=\"{reason}\"}} {n}"
            );
        }
        out.push_str("# HELP mue_worker_panics_total Panics caught in the batching worker.\n");
        out.push_str("# TYPE mue_worker_panics_total counter\n");
        let _ = writeln!(out, "mue_worker_panics_total {}", g.worker_panics);
        out.push_str(
            "# HELP mue_macs_executed_total Multiply-adds executed for answered requests, per task.\n",
        );
        out.push_str("# TYPE mue_macs_executed_total counter\n");
        for task in ["caption", "entail"] {
            let n = g.macs.get(task).map_or(0, |m| m.0);
            let _ = writeln!(out, "mue_macs_executed_total{{task=\"{task}\"}} {n}");
        }
        out.push_str(
            "# HELP mue_macs_full_total Multiply-adds the same requests would run at full depth, per task.\n",
        );
        out.push_str("# TYPE mue_macs_full_total counter\n");
        for task in ["caption", "entail"] {
            let n = g.macs.get(task).map_or(0, |m| m.1);
            let _ = writeln!(out, "mue_macs_full_total{{task=\"{task}\"}} {n}");
        }
        out.push_str("# HELP mue_queue_depth Requests waiting for the worker.\n");
        out.push_str("# TYPE mue_queue_depth gauge\n");
        let _ = writeln!(out, "mue_queue_depth {queue_depth}");
        out.push_str("# HELP mue_queue_capacity Bound of the request queue.\n");
        out.push_str("# TYPE mue_queue_capacity gauge\n");
        let _ = writeln!(out, "mue_queue_capacity {queue_capacity}");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let m = Metrics::new(3);
        m.observe_batch(1);
        m.observe_batch(3);
        m.observe_batch(3);
        m.observe_request("/v1/caption", 200, 0.02);
        let text = m.render(2, 8);
        assert!(text.contains("mue_batch_size_bucket{le=\"1\"} 1\n"));
        assert!(text.contains("mue_batch_size_bucket{le=\"2\"} 1\n"));
        assert!(text.contains("mue_batch_size_bucket{le=\"4\"} 3\n"));
        assert!(text.contains("mue_batch_size_bucket{le=\"+Inf\"} 3\n"));
        assert!(text.contains("mue_batch_size_sum 7\n"));
        assert!(text.contains("mue_requests_total{route=\"/v1/caption\",status=\"200\"} 1\n"));
        assert!(text.contains(
            "mue_request_duration_seconds_bucket{route=\"/v1/caption\",le=\"0.025\"} 1\n"
        ));
        assert!(text.contains("mue_queue_depth 2\n"));
        m.observe_macs("caption", 30, 100);
        m.observe_macs("caption", 20, 100);
        m.observe_dropped("expired");
        let text = m.render(0, 8);
        assert!(text.contains("mue_macs_executed_total{task=\"caption\"} 50\n"));
        assert!(text.contains("mue_macs_full_total{task=\"caption\"} 200\n"));
        assert!(text.contains("mue_macs_full_total{task=\"entail\"} 0\n"));
        assert!(text.contains("mue_requests_dropped_total{reason=\"expired\"} 1\n"));
        assert!(text.contains("mue_requests_dropped_total{reason=\"cancelled\"} 0\n"));
    }
}
