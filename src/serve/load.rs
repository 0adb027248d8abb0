//! A closed-loop load generator against a running server (`mue serve-bench`).

use super::client;
use crate::task::Task;
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
    let path = crate::paths::examples_dir().join("example_0.png");
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

/// The route and JSON body of `spec`'s request.
fn request_body(spec: &LoadSpec) -> Result<(&'static str, Vec<u8>)> {
    let mut body = serde_json::json!({
        "image_base64": base64::engine::general_purpose::STANDARD.encode(&spec.image),
    });
    if spec.task == Task::Entail {
        body["hypothesis"] = spec.hypothesis.clone().into();
    }
    if let Some(e) = &spec.exits {
        body["exits"] = e.clone();
    }
    let path = match spec.task {
        Task::Caption => "/v1/caption",
        Task::Entail => "/v1/entail",
    };
    Ok((path, serde_json::to_vec(&body)?))
}

/// What one request came back with.
enum Outcome {
    /// Latency ms, saved fraction, batch size.
    Ok(f64, f64, f64),
    /// 503 / 429: refused by backpressure, never accepted.
    Rejected,
    /// Any other status, or a transport error.
    Failed,
}

async fn send(addr: SocketAddr, path: &str, body: &[u8]) -> Outcome {
    let t = Instant::now();
    match client::request(addr, "POST", path, Some("application/json"), body).await {
        Ok(r) if r.status == 200 => {
            let ms = t.elapsed().as_secs_f64() * 1e3;
            let v = r.json().unwrap_or_default();
            Outcome::Ok(
                ms,
                v["saved_fraction"].as_f64().unwrap_or(0.0),
                v["batch_size"].as_f64().unwrap_or(0.0),
            )
        }
        Ok(r) if r.status == 503 || r.status == 429 => Outcome::Rejected,
        _ => Outcome::Failed,
    }
}

/// `spec.concurrency` clients each send requests back to back until `spec.requests` are sent.
pub async fn load_test_with(addr: SocketAddr, spec: &LoadSpec) -> Result<Report> {
    let (path, body) = request_body(spec)?;
    let body = Arc::new(body);
    let next = Arc::new(AtomicUsize::new(0));
    let total = spec.requests;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..spec.concurrency.max(1) {
        let (body, next) = (body.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            while next.fetch_add(1, Ordering::SeqCst) < total {
                out.push(send(addr, path, &body).await);
            }
            out
        }));
    }
    let mut outcomes = Vec::new();
    for t in tasks {
        outcomes.extend(t.await?);
    }
    let s = Summary::of(&outcomes);
    Ok(Report {
        requests: total,
        concurrency: spec.concurrency,
        throughput: s.ok as f64 / start.elapsed().as_secs_f64(),
        p50: s.p50,
        p99: s.p99,
        errors: s.rejected + s.failed,
        mean_saved_fraction: s.mean_saved_fraction,
        mean_batch: s.mean_batch,
    })
}

/// Latency percentiles and means over the successful outcomes.
struct Summary {
    ok: usize,
    rejected: usize,
    failed: usize,
    p50: f64,
    p99: f64,
    mean_saved_fraction: f64,
    mean_batch: f64,
}

impl Summary {
    fn of(outcomes: &[Outcome]) -> Summary {
        let mut lat = Vec::new();
        let (mut saved, mut batch, mut rejected, mut failed) = (0.0, 0.0, 0, 0);
        for o in outcomes {
            match o {
                Outcome::Ok(ms, s, b) => {
                    lat.push(*ms);
                    saved += s;
                    batch += b;
                }
                Outcome::Rejected => rejected += 1,
                Outcome::Failed => failed += 1,
            }
        }
        lat.sort_by(|a, b| a.total_cmp(b));
        let n = lat.len().max(1) as f64;
        Summary {
            ok: lat.len(),
            rejected,
            failed,
            p50: percentile(&lat, 0.50),
            p99: percentile(&lat, 0.99),
            mean_saved_fraction: saved / n,
            mean_batch: batch / n,
        }
    }
}

/// One open-loop phase: requests start on a fixed schedule, whatever the server does, so
/// an overloaded server meets its queue bound instead of slowing the clients down.
#[derive(Debug, Clone, Serialize)]
pub struct OpenLoopReport {
    /// Requests per second sent.
    pub offered_rate: f64,
    pub sent: usize,
    pub ok: usize,
    /// Refused with 503/429 (backpressure): never accepted.
    pub rejected: usize,
    /// Accepted requests that did not answer 200, and transport errors.
    pub failed: usize,
    /// Successful requests per second, first send to last answer.
    pub throughput: f64,
    pub p50: f64,
    pub p99: f64,
    pub mean_batch: f64,
    pub mean_saved_fraction: f64,
    /// Largest resident set size of this process seen during the phase, in MiB
    /// (the server runs in-process in `mue serve-bench`).
    pub peak_rss_mib: f64,
}

/// Send `rate` requests per second for `seconds` (no bound on requests in flight).
pub async fn open_loop(
    addr: SocketAddr,
    spec: &LoadSpec,
    rate: f64,
    seconds: f64,
) -> Result<OpenLoopReport> {
    open_loop_clients(addr, spec, rate, seconds, usize::MAX).await
}

/// Send `rate` requests per second for `seconds` from `clients` clients: each takes the
/// next slot of the schedule, sends, and goes on with the next slot whatever the answer
/// (a 503's Retry-After is ignored). When every client is busy the schedule runs late and
/// the clients catch up back to back.
pub async fn open_loop_clients(
    addr: SocketAddr,
    spec: &LoadSpec,
    rate: f64,
    seconds: f64,
    clients: usize,
) -> Result<OpenLoopReport> {
    let mut r = open_loop_rounds(addr, spec, &[rate], seconds, clients, 1).await?;
    Ok(r.remove(0))
}

/// Open-loop phases at each of `rates`, interleaved in `rounds` rounds of
/// `seconds / rounds` each (1x, 3x, 1x, 3x, ...), so that other work on the machine
/// weighs on every rate alike; one report per rate over all its rounds.
pub async fn open_loop_rounds(
    addr: SocketAddr,
    spec: &LoadSpec,
    rates: &[f64],
    seconds: f64,
    clients: usize,
    rounds: usize,
) -> Result<Vec<OpenLoopReport>> {
    anyhow::ensure!(
        rates.iter().all(|r| r.is_finite() && *r > 0.0) && seconds > 0.0,
        "open-loop rates and duration must be positive (got {rates:?} req/s for {seconds} s)"
    );
    anyhow::ensure!(
        clients >= 1 && rounds >= 1,
        "at least one client and one round"
    );
    let (path, body) = request_body(spec)?;
    let body = Arc::new(body);
    // Per rate: outcomes, wall seconds, requests sent, peak RSS.
    let mut acc: Vec<(Vec<Outcome>, f64, usize, u64)> =
        rates.iter().map(|_| (Vec::new(), 0.0, 0, 0)).collect();
    for _ in 0..rounds {
        for (k, &rate) in rates.iter().enumerate() {
            let sent = ((rate * seconds / rounds as f64).round() as usize).max(1);
            let rss = RssSampler::start();
            let start = tokio::time::Instant::now();
            let next = Arc::new(AtomicUsize::new(0));
            let mut tasks = Vec::new();
            for _ in 0..clients.min(sent) {
                let (body, next) = (body.clone(), next.clone());
                tasks.push(tokio::spawn(async move {
                    let mut out = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::SeqCst);
                        if i >= sent {
                            break out;
                        }
                        let at = start + std::time::Duration::from_secs_f64(i as f64 / rate);
                        tokio::time::sleep_until(at).await;
                        out.push(send(addr, path, &body).await);
                    }
                }));
            }
            for t in tasks {
                acc[k].0.extend(t.await?);
            }
            acc[k].1 += start.elapsed().as_secs_f64();
            acc[k].2 += sent;
            acc[k].3 = acc[k].3.max(rss.stop().await);
        }
    }
    Ok(rates
        .iter()
        .zip(acc)
        .map(|(&rate, (outcomes, wall, sent, peak))| {
            let s = Summary::of(&outcomes);
            OpenLoopReport {
                offered_rate: rate,
                sent,
                ok: s.ok,
                rejected: s.rejected,
                failed: s.failed,
                throughput: s.ok as f64 / wall,
                p50: s.p50,
                p99: s.p99,
                mean_batch: s.mean_batch,
                mean_saved_fraction: s.mean_saved_fraction,
                peak_rss_mib: peak as f64 / (1024.0 * 1024.0),
            }
        })
        .collect())
}

/// Resident set size of this process in bytes (Linux; None elsewhere).
pub fn rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Polls `rss_bytes` every 20 ms in the background and keeps the maximum.
struct RssSampler {
    peak: Arc<std::sync::atomic::AtomicU64>,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl RssSampler {
    fn start() -> RssSampler {
        let peak = Arc::new(std::sync::atomic::AtomicU64::new(rss_bytes().unwrap_or(0)));
        let (stop, mut rx) = tokio::sync::oneshot::channel::<()>();
        let p = peak.clone();
        let task = tokio::spawn(async move {
            loop {
                p.fetch_max(rss_bytes().unwrap_or(0), Ordering::SeqCst);
                tokio::select! {
                    _ = &mut rx => break,
                    _ = tokio::time::sleep(std::time::Duration::from_millis(20)) => {}
                }
            }
        });
        RssSampler { peak, stop, task }
    }

    async fn stop(self) -> u64 {
        let _ = self.stop.send(());
        let _ = self.task.await;
        self.peak.load(Ordering::SeqCst)
    }
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
