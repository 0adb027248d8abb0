//! A closed-loop load generator against a running server (`mue serve-bench`).

use super::client;
use crate::cli::Task;
use anyhow::{Context, Result};
use base64::Engine as _;
use serde::Serialize;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// Outcome of a load test. Latencies are in milliseconds over successful requests.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub requests: usize,
    pub concurrency: usize,
    /// Successful requests per second of wall time.
    pub throughput: f64,
    pub p50: f64,
    pub p99: f64,
    /// Requests that failed (transport error or non-200 status).
    pub errors: usize,
    /// Mean saved MAC fraction reported by the server.
    pub mean_saved_fraction: f64,
    /// Mean batch size reported by the server.
    pub mean_batch: f64,
}

/// What to send.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    pub concurrency: usize,
    pub requests: usize,
    pub task: Task,
    /// PNG/JPEG bytes sent with every request.
    pub image: Vec<u8>,
    pub hypothesis: String,
    /// `{"image": f, "text": f, "decoder": f}`; None = the server's defaults.
    pub exits: Option<serde_json::Value>,
}

/// The first shipped example image and a fixed hypothesis, server-default thresholds.
pub async fn load_test(
    addr: SocketAddr,
    concurrency: usize,
    requests: usize,
    task: Task,
) -> Result<Report> {
    let path = crate::cli::demo::examples_dir().join("example_0.png");
    let image = std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
    load_test_with(
        addr,
        &LoadSpec {
            concurrency,
            requests,
            task,
            image,
            hypothesis: "there is a red circle".into(),
            exits: None,
        },
    )
    .await
}

/// `spec.concurrency` clients each send requests back to back until `spec.requests` are sent.
pub async fn load_test_with(addr: SocketAddr, spec: &LoadSpec) -> Result<Report> {
    let mut body = serde_json::json!({
        "image_base64": base64::engine::general_purpose::STANDARD.encode(&spec.image),
    });
    if spec.task == Task::Entail {
        body["hypothesis"] = spec.hypothesis.clone().into();
    }
    if let Some(e) = &spec.exits {
        body["exits"] = e.clone();
    }
    let body = Arc::new(serde_json::to_vec(&body)?);
    let path = match spec.task {
        Task::Caption => "/v1/caption",
        Task::Entail => "/v1/entail",
    };
    let next = Arc::new(AtomicUsize::new(0));
    let total = spec.requests;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..spec.concurrency.max(1) {
        let (body, next) = (body.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            // (latency ms, saved fraction, batch size) per success; error count.
            let mut ok = Vec::new();
            let mut errors = 0usize;
            while next.fetch_add(1, Ordering::SeqCst) < total {
                let t = Instant::now();
                match client::request(addr, "POST", path, Some("application/json"), &body).await {
                    Ok(r) if r.status == 200 => {
                        let ms = t.elapsed().as_secs_f64() * 1e3;
                        let v = r.json().unwrap_or_default();
                        ok.push((
                            ms,
                            v["saved_fraction"].as_f64().unwrap_or(0.0),
                            v["batch_size"].as_f64().unwrap_or(0.0),
                        ));
                    }
                    _ => errors += 1,
                }
            }
            (ok, errors)
        }));
    }
    let mut ok = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (o, e) = t.await?;
        ok.extend(o);
        errors += e;
    }
    let wall = start.elapsed().as_secs_f64();
    let mut lat: Vec<f64> = ok.iter().map(|o| o.0).collect();
    lat.sort_by(|a, b| a.total_cmp(b));
    let n = ok.len().max(1) as f64;
    Ok(Report {
        requests: total,
        concurrency: spec.concurrency,
        throughput: ok.len() as f64 / wall,
        p50: percentile(&lat, 0.50),
        p99: percentile(&lat, 0.99),
        errors,
        mean_saved_fraction: ok.iter().map(|o| o.1).sum::<f64>() / n,
        mean_batch: ok.iter().map(|o| o.2).sum::<f64>() / n,
    })
}

/// Nearest-rank percentile of sorted values (0 when empty).
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[cfg(test)]
mod tests {
    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<f64> = (1..=100).map(|x| x as f64).collect();
        assert_eq!(super::percentile(&v, 0.5), 50.0);
        assert_eq!(super::percentile(&v, 0.99), 99.0);
        assert_eq!(super::percentile(&[7.0], 0.99), 7.0);
        assert_eq!(super::percentile(&[], 0.5), 0.0);
    }
}
