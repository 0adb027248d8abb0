//! `mue serve`: the HTTP API (see `crate::serve`).

use super::demo::load_engine;
use super::TaskThresholds;
use crate::generate::SearchConfig;
use crate::serve::{self, ServeConfig};
use anyhow::{Context, Result};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// Model directory [default: $MUE_MODEL, ./models/default, or models/default beside
    /// the executable]; one that does not exist or does not load is an error.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Serve a RANDOM model instead (predictions are meaningless; for testing).
    #[arg(long, conflicts_with = "model")]
    pub random_weights: bool,
    #[command(flatten)]
    pub load: super::load::LoadArgs,
    /// Address to listen on.
    #[arg(long, env = "MUE_ADDR", default_value = "127.0.0.1:8080")]
    pub addr: String,
    /// Most requests per engine call.
    #[arg(long, env = "MUE_MAX_BATCH", default_value_t = 8)]
    pub max_batch: usize,
    /// How long a request waits for others to batch with, in ms.
    #[arg(long, env = "MUE_MAX_WAIT_MS", default_value_t = 10)]
    pub max_wait_ms: u64,
    /// Bound of the request queue (full queue answers 503).
    #[arg(long, env = "MUE_QUEUE", default_value_t = 64)]
    pub queue: usize,
    /// Per-request timeout in ms (answers 504).
    #[arg(long, env = "MUE_TIMEOUT_MS", default_value_t = 30_000)]
    pub timeout_ms: u64,
    /// Largest request body in bytes (answers 413).
    #[arg(long, env = "MUE_MAX_BODY", default_value_t = 10 * 1024 * 1024)]
    pub max_body: usize,
    /// Largest image side in pixels.
    #[arg(long, default_value_t = 4096)]
    pub max_image_side: u32,
    /// Memory one image may take while decoded (pixels x channels x bytes per channel,
    /// plus its 8-bit RGB copy), in MiB; larger images are refused from their header.
    #[arg(long, default_value_t = 128)]
    pub decode_budget_mib: usize,
    /// Open connections at most (further ones wait in the listen backlog).
    #[arg(long, env = "MUE_MAX_CONNECTIONS", default_value_t = 512)]
    pub max_connections: usize,
    /// Close a connection that has not sent a full request head within this (also the
    /// idle keep-alive bound), in ms.
    #[arg(long, default_value_t = 10_000)]
    pub header_timeout_ms: u64,
    /// Answer 408 when a request body has not arrived in full within this, in ms.
    #[arg(long, default_value_t = 10_000)]
    pub body_timeout_ms: u64,
    /// On SIGTERM / ctrl-c, cut connections still open after this, in ms.
    #[arg(long, default_value_t = 10_000)]
    pub drain_ms: u64,
    /// Beam size for captioning.
    #[arg(long, default_value_t = 5)]
    pub beam: usize,
    /// Longest caption in tokens (below the model's decoder positions).
    #[arg(long, default_value_t = 16)]
    pub max_len: usize,
}

impl ServeArgs {
    pub fn config(&self, thresholds: TaskThresholds) -> ServeConfig {
        ServeConfig {
            max_batch: self.max_batch,
            max_wait: Duration::from_millis(self.max_wait_ms),
            queue: self.queue,
            timeout: Duration::from_millis(self.timeout_ms),
            max_body: self.max_body,
            max_image_side: self.max_image_side,
            decode_budget: self.decode_budget_mib.saturating_mul(1 << 20),
            max_connections: self.max_connections,
            header_timeout: Duration::from_millis(self.header_timeout_ms),
            body_timeout: Duration::from_millis(self.body_timeout_ms),
            drain_timeout: Duration::from_millis(self.drain_ms),
            thresholds,
            search: SearchConfig {
                beam: self.beam,
                max_len: self.max_len,
                ..SearchConfig::default()
            },
            ..ServeConfig::default()
        }
    }
}

/// Resolves on ctrl-c or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}

pub fn main(args: ServeArgs) -> Result<()> {
    // Flags that need no model are checked before it is loaded, the rest before listening.
    args.config(TaskThresholds::default()).validate_flags()?;
    let (engine, thresholds) = load_engine(
        args.model.as_deref(),
        args.random_weights,
        "serving",
        &args.load.options(),
    )?;
    let cfg = args.config(thresholds);
    cfg.validate(&engine)?;
    // Before listening, so that the first request is not the one paying one-time costs.
    let t = std::time::Instant::now();
    engine.warm_up()?;
    eprintln!(
        "mue serve: warmed up in {:.0} ms",
        t.elapsed().as_secs_f64() * 1e3
    );
    let drain_ms = args.drain_ms;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(&args.addr)
            .await
            .with_context(|| format!("cannot listen on {}", args.addr))?;
        eprintln!("mue serve: listening on http://{}", listener.local_addr()?);
        let signal = async move {
            shutdown_signal().await;
            eprintln!(
                "mue serve: shutdown signal: no new connections; finishing open requests \
                 (at most {drain_ms} ms)"
            );
        };
        let d = serve::run(listener, Arc::new(engine), cfg, signal).await?;
        eprintln!(
            "mue serve: stopped after draining for {:.0} ms ({} connections cut at the bound)",
            d.drain_ms, d.cut
        );
        Ok(())
    })
}

/// `mue serve-bench`: load figures for the server, measured in one run.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeBenchArgs {
    /// Model directory [default: $MUE_MODEL, ./models/default, or models/default beside
    /// the executable].
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Use a RANDOM model instead (for testing).
    #[arg(long, conflicts_with = "model")]
    pub random_weights: bool,
    #[arg(long, value_enum, default_value = "entail")]
    pub task: super::Task,
    /// Seconds of each open-loop phase (and of the saturation probe).
    #[arg(long, default_value_t = 15.0)]
    pub seconds: f64,
    /// Most requests per engine call.
    #[arg(long, default_value_t = 8)]
    pub max_batch: usize,
    /// How long a request waits for others to batch with, in ms.
    #[arg(long, default_value_t = 10)]
    pub max_wait_ms: u64,
    /// Bound of the request queue.
    #[arg(long, default_value_t = 64)]
    pub queue: usize,
    /// Per-request timeout in ms (admission refuses what would wait longer).
    #[arg(long, default_value_t = 30_000)]
    pub timeout_ms: u64,
    /// Concurrent clients of the open-loop phases; they ignore Retry-After.
    #[arg(long, default_value_t = 200)]
    pub clients: usize,
    /// Offered loads, as multiples of the measured capacity.
    #[arg(long, value_delimiter = ',', default_value = "1,3")]
    pub loads: Vec<f64>,
    /// The load phases run interleaved in this many rounds (`--seconds` in all per load),
    /// so that other work on the machine weighs on every load alike.
    #[arg(long, default_value_t = 4)]
    pub rounds: usize,
    /// Send a large image instead: the first example upscaled to SIDE x SIDE (with a
    /// deterministic noise so that the PNG stays large), to measure memory under load.
    #[arg(long)]
    pub image_side: Option<u32>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// One row of the serve-bench table.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ServeBenchRow {
    /// `mue` (the model's calibrated thresholds) or `full` (every layer).
    pub exits: &'static str,
    /// Offered load as a multiple of the measured saturation throughput.
    pub load: f64,
    #[serde(flatten)]
    pub report: serve::load::OpenLoopReport,
}

/// For MuE exits and for full depth: the saturation throughput of a closed loop with
/// 2 x max-batch clients, then open-loop phases at `--loads` times that rate from
/// `--clients` clients that ignore Retry-After.
pub fn bench_main(args: ServeBenchArgs) -> Result<()> {
    anyhow::ensure!(
        args.seconds.is_finite() && args.seconds > 0.0,
        "--seconds must be positive, got {}",
        args.seconds
    );
    anyhow::ensure!(args.max_batch >= 1, "--max-batch must be at least 1");
    anyhow::ensure!(args.rounds >= 1, "--rounds must be at least 1");
    anyhow::ensure!(args.clients >= 1, "--clients must be at least 1");
    let (engine, thresholds) = load_engine(
        args.model.as_deref(),
        args.random_weights,
        "benchmarking",
        &Default::default(),
    )?;
    anyhow::ensure!(
        args.loads.iter().all(|l| l.is_finite() && *l > 0.0),
        "--loads must be positive multiples, got {:?}",
        args.loads
    );
    let image_path = super::demo::examples_dir().join("example_0.png");
    let mut image = std::fs::read(&image_path)
        .with_context(|| format!("cannot read {}", image_path.display()))?;
    if let Some(side) = args.image_side {
        image = large_png(&image, side)?;
        eprintln!(
            "serve-bench: {side}x{side} RGB image, {:.1} MiB as PNG",
            image.len() as f64 / 1048576.0
        );
    }
    let cfg = ServeConfig {
        max_batch: args.max_batch,
        max_wait: Duration::from_millis(args.max_wait_ms),
        queue: args.queue,
        timeout: Duration::from_millis(args.timeout_ms),
        // Room for the image as base64 in JSON.
        max_body: (image.len() * 4 / 3 + 4096).max(ServeConfig::default().max_body),
        thresholds,
        ..ServeConfig::default()
    };
    cfg.validate(&engine)?;
    let mib = |b: usize| b as f64 / 1048576.0;
    let bound =
        mib(cfg.queue * cfg.max_body) + mib(cfg.decoders * (cfg.decode_budget + 3 * cfg.max_body));
    eprintln!(
        "serve-bench: the request path holds at most {:.0} MiB: {} admission slots x {:.1} MiB \
         body + {} decoders x ({} MiB decode budget + 3 x {:.1} MiB parse copies)",
        bound,
        cfg.queue,
        mib(cfg.max_body),
        cfg.decoders,
        cfg.decode_budget >> 20,
        mib(cfg.max_body)
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let rows = rt.block_on(async move {
        let server = serve::Server::start("127.0.0.1:0", Arc::new(engine), cfg).await?;
        let rss_start = serve::load::rss_bytes().unwrap_or(0);
        let mut rows = Vec::new();
        let full = serde_json::json!({"image": 2.0, "text": 2.0, "decoder": 2.0});
        for (name, exits) in [("mue", None), ("full", Some(full))] {
            let spec = serve::load::LoadSpec {
                concurrency: 2 * args.max_batch,
                requests: 4 * args.max_batch,
                task: args.task,
                image: image.clone(),
                hypothesis: "there is a red circle".into(),
                exits,
            };
            // A short closed loop to warm up and estimate the rate, then one of `seconds`.
            let probe = serve::load::load_test_with(server.addr, &spec).await?;
            let spec = serve::load::LoadSpec {
                requests: ((probe.throughput * args.seconds).ceil() as usize).max(spec.requests),
                ..spec
            };
            let saturation = serve::load::load_test_with(server.addr, &spec).await?;
            anyhow::ensure!(
                saturation.throughput > 0.0,
                "no request succeeded while measuring saturation ({} errors)",
                saturation.errors
            );
            let rates: Vec<f64> = args
                .loads
                .iter()
                .map(|l| l * saturation.throughput)
                .collect();
            let reports = serve::load::open_loop_rounds(
                server.addr,
                &spec,
                &rates,
                args.seconds,
                args.clients,
                args.rounds,
            )
            .await?;
            for (&load, report) in args.loads.iter().zip(reports) {
                rows.push(ServeBenchRow {
                    exits: name,
                    load,
                    report,
                });
            }
        }
        server.shutdown().await?;
        let rss_end = serve::load::rss_bytes().unwrap_or(0);
        eprintln!(
            "resident memory: {:.0} MiB after start, {:.0} MiB at the end",
            rss_start as f64 / 1048576.0,
            rss_end as f64 / 1048576.0
        );
        anyhow::Ok(rows)
    })?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!(
        "| exits | load | offered req/s | ok req/s | p50 ms | p99 ms | rejected (503) | failed | mean batch | saved MACs | peak RSS MiB |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for r in &rows {
        let p = &r.report;
        println!(
            "| {} | {}x | {:.1} | {:.1} | {:.1} | {:.1} | {} / {} | {} | {:.2} | {:.1}% | {:.0} |",
            r.exits,
            r.load,
            p.offered_rate,
            p.throughput,
            p.p50,
            p.p99,
            p.rejected,
            p.sent,
            p.failed,
            p.mean_batch,
            100.0 * p.mean_saved_fraction,
            p.peak_rss_mib
        );
    }
    Ok(())
}

/// The example upscaled to `side` x `side` with a fixed noise pattern (PNG cannot squeeze
/// it much, so the upload and its decode cost what a photo of that size would).
fn large_png(example: &[u8], side: u32) -> Result<Vec<u8>> {
    anyhow::ensure!(
        (16..=8192).contains(&side),
        "--image-side must be in 16..=8192"
    );
    let img = image::load_from_memory(example)?.to_rgb8();
    let mut big = image::imageops::resize(&img, side, side, image::imageops::FilterType::Triangle);
    let mut x: u32 = 0x9e37_79b9;
    for p in big.pixels_mut() {
        for c in p.0.iter_mut() {
            // xorshift: +-8 levels of noise per channel.
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            *c = c.saturating_add((x & 15) as u8).saturating_sub(8);
        }
    }
    let mut out = Vec::new();
    image::DynamicImage::ImageRgb8(big)
        .write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)?;
    Ok(out)
}
