//! `mue serve`: the HTTP API (see `crate::serve`).

use super::demo::random_engine;
use super::TaskThresholds;
use crate::generate::SearchConfig;
use crate::pipeline::Engine;
use crate::serve::{self, ServeConfig};
use anyhow::{Context, Result};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// Model directory; without config.json there a RANDOM model is served (for testing).
    #[arg(long, env = "MUE_MODEL", default_value_os_t = super::default_model_dir())]
    pub model: PathBuf,
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
    /// Beam size for captioning.
    #[arg(long, default_value_t = 5)]
    pub beam: usize,
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
    let (engine, thresholds) = if args.model.join("config.json").is_file() {
        (
            Engine::load(&args.model)?,
            TaskThresholds::for_model(&args.model)?,
        )
    } else {
        eprintln!(
            "note: no trained model at {}; serving a RANDOM model (predictions are meaningless, exits and costs are real)",
            args.model.display()
        );
        (random_engine(0)?, TaskThresholds::default())
    };
    let cfg = args.config(thresholds);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(&args.addr)
            .await
            .with_context(|| format!("cannot listen on {}", args.addr))?;
        eprintln!("mue serve: listening on http://{}", listener.local_addr()?);
        serve::run(listener, Arc::new(engine), cfg, shutdown_signal()).await
    })
}
