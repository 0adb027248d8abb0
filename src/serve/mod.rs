//! `mue serve`: an HTTP API over the engine with dynamic batching on a worker thread.
//!
//! Routes: `POST /v1/caption`, `POST /v1/entail` (JSON or multipart), `GET /healthz`,
//! `GET /readyz`, `GET /metrics` (Prometheus text), `GET /` (demo page),
//! `GET /examples.json`, `GET /examples/{name}.png`, `GET /favicon.ico`.
//!
//! Under hostile traffic: connections are capped (`max_connections`, a semaphore around
//! accept) and each has a header read timeout (hyper's, also the idle keep-alive bound);
//! bodies have a read timeout and a size limit; a request takes an admission slot before
//! its body is read (503 + Retry-After when the queue is full or its estimated wait is over
//! the timeout); images are checked against a decode budget from their header and reduced
//! to the model's input size before they are queued; shutdown drains within a bound.

pub mod client;
pub mod load;
pub mod metrics;
mod page;
pub mod queue;
mod request;

use crate::generate::{Exits, SearchConfig};
use crate::pipeline::{Engine, EntailRequest};
use crate::task::{Task, TaskThresholds, MAX_TEXT_CHARS};
use anyhow::Result;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use metrics::Metrics;
use page::{example_png, examples_json, favicon, index};
use queue::{Admission, Hooks, Job, JobInput, JobOutput, PushError, Queue, Refusal};
pub use request::decode_image;
use request::{policy_of, preprocess, read_body, read_fields};
use serde_json::{json, Value};
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{oneshot, Semaphore};

/// Server settings.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Most requests per engine call.
    pub max_batch: usize,
    /// How long the oldest queued request waits for others to join its batch.
    pub max_wait: Duration,
    /// Admission slots: inference requests being read, decoded, queued or computed at once
    /// (503 above it). Must be at least 1.
    pub queue: usize,
    /// Per-request limit from queueing to answer (504 after it).
    pub timeout: Duration,
    /// Largest accepted request body in bytes (413 above it).
    pub max_body: usize,
    /// Largest accepted image side in pixels (400 above it).
    pub max_image_side: u32,
    /// Default thresholds per task when a request gives none.
    pub thresholds: TaskThresholds,
    pub search: SearchConfig,
    /// Folder of example PNGs and `examples.json` served to the demo page.
    pub examples_dir: PathBuf,
    /// Open connections at most; further ones wait in the listen backlog.
    pub max_connections: usize,
    /// A connection that has not sent a full request head within this is closed (also the
    /// idle keep-alive bound).
    pub header_timeout: Duration,
    /// A request body not received in full within this is answered 408.
    pub body_timeout: Duration,
    /// After a shutdown signal, connections still open after this are cut.
    pub drain_timeout: Duration,
    /// Bytes one image may take decoded (plus its 8-bit RGB copy); larger ones are refused
    /// from their header, before decoding.
    pub decode_budget: usize,
    /// Images decoded at once (each within `decode_budget`).
    pub decoders: usize,
    #[doc(hidden)]
    pub hooks: Arc<Hooks>,
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            max_batch: 8,
            max_wait: Duration::from_millis(10),
            queue: 64,
            timeout: Duration::from_secs(30),
            max_body: 10 * 1024 * 1024,
            max_image_side: 4096,
            thresholds: TaskThresholds::default(),
            search: SearchConfig::default(),
            examples_dir: crate::paths::examples_dir(),
            max_connections: 512,
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(10),
            decode_budget: 128 << 20,
            decoders: std::thread::available_parallelism().map_or(2, |n| n.get()),
            hooks: Arc::default(),
        }
    }
}

impl ServeConfig {
    /// Every setting checked before the server listens; errors name the flag.
    pub fn validate(&self, engine: &Engine) -> Result<()> {
        self.validate_flags()?;
        let positions = engine.model.cfg.max_positions;
        anyhow::ensure!(
            self.search.max_len < positions,
            "--max-len {} is too long for this model: its decoder has {positions} positions, \
             so --max-len must be at most {}",
            self.search.max_len,
            positions - 1
        );
        Ok(())
    }

    /// The checks that need no model (run before it is loaded).
    pub fn validate_flags(&self) -> Result<()> {
        use anyhow::ensure;
        ensure!(self.max_batch >= 1, "--max-batch must be at least 1");
        ensure!(
            self.queue >= 1,
            "--queue must be at least 1 (0 would refuse every request)"
        );
        ensure!(
            !self.timeout.is_zero(),
            "--timeout-ms must be positive (0 would time out every request)"
        );
        ensure!(
            self.max_body >= 1,
            "--max-body must be positive (0 would refuse every request body)"
        );
        ensure!(
            self.max_image_side >= 1,
            "--max-image-side must be positive"
        );
        ensure!(
            self.max_connections >= 1,
            "--max-connections must be at least 1"
        );
        ensure!(
            !self.header_timeout.is_zero(),
            "--header-timeout-ms must be positive"
        );
        ensure!(
            !self.body_timeout.is_zero(),
            "--body-timeout-ms must be positive"
        );
        ensure!(
            self.decode_budget >= 1,
            "--decode-budget-mib must be positive"
        );
        ensure!(self.decoders >= 1, "decoders must be at least 1");
        self.search
            .validate()
            .map_err(|e| anyhow::anyhow!("--beam/--max-len: {e:#}"))?;
        Ok(())
    }
}

struct AppState {
    engine: Arc<Engine>,
    cfg: ServeConfig,
    queue: Arc<Queue>,
    metrics: Arc<Metrics>,
    admission: Arc<Admission>,
    /// Image decodes at once.
    decoders: Semaphore,
    ready: AtomicBool,
    /// False once the batching worker's thread has ended.
    worker_alive: Arc<AtomicBool>,
    /// Inference requests queued or being computed.
    in_flight: AtomicUsize,
}

type Shared = Arc<AppState>;

/// An error answer: status plus a JSON `{"error": ...}` body.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// Seconds for `Retry-After` (503 only; 1 when unset).
    pub retry_after: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            retry_after: None,
        }
    }
    fn bad(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }
    /// A 500 whose details go to the log, never to the client.
    fn internal(detail: impl std::fmt::Display) -> Self {
        tracing::error!("internal error: {detail}");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal error (details are in the server log)",
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (self.status, Json(json!({ "error": self.message }))).into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            let secs = self.retry_after.unwrap_or(1).max(1);
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }
}

/// How a server run ended.
#[derive(Debug, Clone)]
pub struct Drained {
    /// From the shutdown signal to the last connection closing (or the drain bound).
    pub drain_ms: f64,
    /// Connections still open at the drain bound, cut.
    pub cut: usize,
}

/// Serve on `listener` until `shutdown` resolves; then stop accepting, let open
/// connections finish their requests for at most `drain_timeout`, cut the rest, and stop
/// the worker once the queue is drained.
pub async fn run(
    listener: tokio::net::TcpListener,
    engine: Arc<Engine>,
    cfg: ServeConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<Drained> {
    cfg.validate(&engine)?;
    let queue = Arc::new(Queue::new(cfg.queue));
    let max_layers = engine
        .model
        .cfg
        .encoder_layers
        .max(engine.model.cfg.decoder_layers);
    let metrics = Arc::new(Metrics::new(max_layers));
    let admission = Arc::new(Admission::new(cfg.queue, cfg.max_batch, cfg.decoders));
    let worker_alive = Arc::new(AtomicBool::new(true));
    let worker = {
        let ctx = queue::WorkerCtx {
            engine: engine.clone(),
            queue: queue.clone(),
            metrics: metrics.clone(),
            admission: admission.clone(),
            alive: worker_alive.clone(),
            hooks: cfg.hooks.clone(),
            max_batch: cfg.max_batch,
            max_wait: cfg.max_wait,
            search: cfg.search,
        };
        std::thread::Builder::new()
            .name("mue-batcher".into())
            .spawn(move || queue::worker(ctx))?
    };
    let state = Arc::new(AppState {
        engine,
        decoders: Semaphore::new(cfg.decoders),
        cfg,
        queue: queue.clone(),
        metrics,
        admission,
        ready: AtomicBool::new(true),
        worker_alive,
        in_flight: AtomicUsize::new(0),
    });
    let app = router(state.clone());
    let drained = serve_connections(listener, app, &state, shutdown).await;
    queue.close();
    tokio::task::spawn_blocking(move || worker.join())
        .await?
        .map_err(|_| anyhow::anyhow!("batching worker panicked"))?;
    Ok(drained)
}

/// The accept loop: at most `max_connections` open (a permit per connection), hyper's
/// HTTP/1 with a header read timeout, graceful shutdown bounded by `drain_timeout`.
async fn serve_connections(
    listener: tokio::net::TcpListener,
    app: Router,
    st: &Shared,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Drained {
    use hyper_util::rt::{TokioIo, TokioTimer};
    let slots = Arc::new(Semaphore::new(st.cfg.max_connections));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(st.cfg.header_timeout)
        // A client that half-closes after a short body still gets its 400.
        .half_close(true);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut conns = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => p.expect("never closed"),
            _ = &mut shutdown => break,
        };
        let stream = loop {
            tokio::select! {
                r = listener.accept() => match r {
                    Ok((s, _)) => break Some(s),
                    Err(e) => {
                        // E.g. out of file descriptors: back off instead of spinning.
                        tracing::warn!("accept error: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
                _ = &mut shutdown => break None,
            }
        };
        let Some(stream) = stream else { break };
        let svc = hyper_util::service::TowerToHyperService::new(app.clone());
        let conn = graceful.watch(http.serve_connection(TokioIo::new(stream), svc));
        conns.spawn(async move {
            let _ = conn.await;
            drop(permit);
        });
    }
    drop(listener);
    st.ready.store(false, Ordering::SeqCst);
    let t = Instant::now();
    tracing::info!("shutting down: finishing open requests");
    let all_closed = tokio::time::timeout(st.cfg.drain_timeout, async {
        graceful.shutdown().await;
        while conns.join_next().await.is_some() {}
    })
    .await
    .is_ok();
    let cut = if all_closed { 0 } else { conns.len() };
    conns.abort_all();
    while conns.join_next().await.is_some() {}
    Drained {
        drain_ms: t.elapsed().as_secs_f64() * 1e3,
        cut,
    }
}

/// A server running in the background (for tests and benchmarks).
pub struct Server {
    pub addr: std::net::SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<Drained>>,
}

impl Server {
    /// Bind `addr` (e.g. `127.0.0.1:0`) and serve in a tokio task.
    pub async fn start(addr: &str, engine: Arc<Engine>, cfg: ServeConfig) -> Result<Server> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let (stop, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(run(listener, engine, cfg, async move {
            let _ = rx.await;
        }));
        Ok(Server {
            addr,
            stop: Some(stop),
            task,
        })
    }

    /// Graceful shutdown; waits until accepted requests are answered (within the drain bound).
    pub async fn shutdown(mut self) -> Result<Drained> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        self.task.await?
    }
}

fn router(state: Shared) -> Router {
    let limit = state.cfg.max_body;
    Router::new()
        .route("/", get(index))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .route("/examples.json", get(examples_json))
        .route("/examples/{name}", get(example_png))
        .route("/v1/caption", post(caption))
        .route("/v1/entail", post(entail))
        .route("/favicon.ico", get(favicon))
        .fallback(not_found)
        .method_not_allowed_fallback(wrong_method)
        .layer(DefaultBodyLimit::max(limit))
        .layer(middleware::from_fn_with_state(state.clone(), track))
        .with_state(state)
}

/// Counts a request whose connection closed before it was answered as status 499 (the
/// client closed it: nginx's code), so that it shows up as a client error.
struct Tracked {
    st: Shared,
    route: String,
    t: Instant,
    done: bool,
}

impl Drop for Tracked {
    fn drop(&mut self) {
        if !self.done {
            self.st
                .metrics
                .observe_request(&self.route, 499, self.t.elapsed().as_secs_f64());
        }
    }
}

async fn track(State(st): State<Shared>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".to_string());
    let mut g = Tracked {
        st,
        route,
        t: Instant::now(),
        done: false,
    };
    let resp = next.run(req).await;
    g.done = true;
    g.st.metrics.observe_request(
        &g.route,
        resp.status().as_u16(),
        g.t.elapsed().as_secs_f64(),
    );
    resp
}

async fn not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!("no route {method} {} (see GET / for the API)", uri.path()),
    )
}

async fn wrong_method(method: Method, uri: Uri) -> ApiError {
    let allowed = if uri.path().starts_with("/v1/") {
        "POST"
    } else {
        "GET"
    };
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!(
            "method {method} not allowed on {}: use {allowed}",
            uri.path()
        ),
    )
}

async fn readyz(State(st): State<Shared>) -> Response {
    if !st.worker_alive.load(Ordering::SeqCst) {
        (StatusCode::SERVICE_UNAVAILABLE, "batching worker stopped\n").into_response()
    } else if st.ready.load(Ordering::SeqCst) {
        "ready\n".into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n").into_response()
    }
}

async fn metrics_text(State(st): State<Shared>) -> Response {
    let mut body = st.metrics.render(st.queue.len(), st.queue.capacity());
    body.push_str("# HELP mue_requests_in_flight Inference requests queued or computing.\n");
    body.push_str("# TYPE mue_requests_in_flight gauge\n");
    body.push_str(&format!(
        "mue_requests_in_flight {}\n",
        st.in_flight.load(Ordering::SeqCst)
    ));
    body.push_str("# HELP mue_admitted Inference requests holding an admission slot.\n");
    body.push_str("# TYPE mue_admitted gauge\n");
    body.push_str(&format!("mue_admitted {}\n", st.admission.admitted()));
    body.push_str("# HELP mue_worker_up 1 while the batching worker runs.\n");
    body.push_str("# TYPE mue_worker_up gauge\n");
    body.push_str(&format!(
        "mue_worker_up {}\n",
        u8::from(st.worker_alive.load(Ordering::SeqCst))
    ));
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}

async fn caption(State(st): State<Shared>, req: Request) -> Result<Json<Value>, ApiError> {
    infer(st, Task::Caption, req).await
}

async fn entail(State(st): State<Shared>, req: Request) -> Result<Json<Value>, ApiError> {
    infer(st, Task::Entail, req).await
}

fn exits_json(e: &Exits) -> Value {
    json!({
        "image_layer": e.image_layer,
        "text_layer": e.text_layer,
        "token_layers": e.token_layers,
        "encoder_layers": e.encoder_layers,
        "decoder_layers": e.decoder_layers,
    })
}

struct InFlight<'a>(&'a AtomicUsize);

impl<'a> InFlight<'a> {
    fn enter(n: &'a AtomicUsize) -> Self {
        n.fetch_add(1, Ordering::SeqCst);
        InFlight(n)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn infer(st: Shared, task: Task, req: Request) -> Result<Json<Value>, ApiError> {
    let t0 = Instant::now();
    let deadline = t0 + st.cfg.timeout;
    let refuse = |reason: &'static str, msg: String, retry: f64| {
        st.metrics.observe_rejected(reason);
        ApiError {
            retry_after: Some(retry.ceil().max(1.0) as u64),
            ..ApiError::new(StatusCode::SERVICE_UNAVAILABLE, msg)
        }
    };
    if !st.ready.load(Ordering::SeqCst) || !st.worker_alive.load(Ordering::SeqCst) {
        return Err(refuse(
            "shutting_down",
            "server is shutting down".into(),
            1.0,
        ));
    }
    // Admission before the body is read, parsed or decoded: refusing costs next to nothing.
    let ticket = match st.admission.try_admit(st.cfg.timeout) {
        Ok(t) => t,
        Err(Refusal::Full) => {
            let wait = st.admission.estimate(st.cfg.queue);
            return Err(refuse(
                "queue_full",
                "queue is full, retry later".into(),
                wait,
            ));
        }
        Err(Refusal::Wait(wait)) => {
            return Err(refuse(
                "wait",
                format!(
                    "overloaded: estimated wait {:.0} ms is over the {} ms timeout, retry later",
                    wait * 1e3,
                    st.cfg.timeout.as_millis()
                ),
                wait,
            ))
        }
    };
    let (parts, body) = req.into_parts();
    if let Some(len) = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
    {
        if len > st.cfg.max_body as u64 {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "body: {len} bytes is larger than the limit of {} bytes (--max-body)",
                    st.cfg.max_body
                ),
            ));
        }
    }
    let body = read_body(&st, body).await?;
    // Parsing (base64, multipart) and decoding copy the body: at most `decoders` at once.
    let permit = st.decoders.acquire().await.expect("never closed");
    let decode_start = Instant::now();
    let f = read_fields(&st, parts, body).await?;
    let bytes = f
        .image
        .ok_or_else(|| ApiError::bad("image: missing (image_base64 in JSON, or an image part)"))?;
    let policy = policy_of(&f.exits, st.cfg.thresholds.get(task))?;
    // Text checks are cheap: before the image is decoded.
    let text = match task {
        Task::Caption => None,
        Task::Entail => {
            let hyp = f.hypothesis.unwrap_or_default();
            if hyp.trim().is_empty() {
                return Err(ApiError::bad("hypothesis: missing or empty"));
            }
            for (name, text) in [("hypothesis", Some(&hyp)), ("premise", f.premise.as_ref())] {
                if text.is_some_and(|t| t.chars().count() > MAX_TEXT_CHARS) {
                    return Err(ApiError::bad(format!(
                        "{name}: longer than {MAX_TEXT_CHARS} characters"
                    )));
                }
            }
            st.engine
                .entail_prompt(&hyp, f.premise.as_deref())
                .map_err(|e| ApiError::bad(format!("hypothesis: {e:#}")))?;
            Some((hyp, f.premise))
        }
    };
    let (max_side, budget) = (st.cfg.max_image_side, st.cfg.decode_budget);
    let size = st.engine.model.cfg.image_size as u32;
    let image = tokio::task::spawn_blocking(move || {
        decode_image(&bytes, max_side, budget).map(|img| preprocess(&img, size))
    })
    .await
    .map_err(ApiError::internal)?
    .map_err(ApiError::bad)?;
    drop(permit);
    st.admission
        .observe_decode(decode_start.elapsed().as_secs_f64());
    let input = match text {
        None => JobInput::Caption(image),
        Some((hypothesis, premise)) => JobInput::Entail(EntailRequest {
            image,
            hypothesis,
            premise,
        }),
    };
    let (tx, rx) = oneshot::channel();
    let job = Job {
        input,
        policy,
        enqueued: Instant::now(),
        deadline,
        reply: tx,
        ticket,
    };
    if let Err((why, _)) = st.queue.push(job) {
        return Err(match why {
            PushError::Full => refuse("queue_full", "queue is full, retry later".into(), 1.0),
            PushError::Closed => refuse("shutting_down", "server is shutting down".into(), 1.0),
        });
    }
    let waited = {
        // Decrements also when the client disconnects and this future is dropped.
        let _guard = InFlight::enter(&st.in_flight);
        tokio::time::timeout_at(deadline.into(), rx).await
    };
    let done = match waited {
        Ok(Ok(d)) => d,
        Ok(Err(_)) if Instant::now() < deadline => {
            return Err(ApiError::internal("worker dropped the request"))
        }
        // Timed out; or the worker dropped the job as expired before this timer fired.
        _ => {
            return Err(ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                format!("request timed out after {} ms", st.cfg.timeout.as_millis()),
            ))
        }
    };
    let out = done.output.map_err(ApiError::internal)?;
    let dec = policy.decoder.tau();
    let mut v = match &out {
        JobOutput::Caption(c) => json!({
            "task": "caption",
            "caption": c.caption,
            "tokens": c.tokens,
            // Each token's text alone, for showing the layer each token left at.
            "token_texts": c.tokens.iter().map(|&t| {
                st.engine.tokenizer.decode(&[t]).unwrap_or_default()
            }).collect::<Vec<_>>(),
            "exits": exits_json(&c.exits),
            "saved_fraction": c.cost.saved_fraction,
            "layer_reduction": c.cost.layer_reduction,
            "macs": {"executed": c.cost.macs_executed, "full": c.cost.macs_full},
        }),
        JobOutput::Entail(e) => json!({
            "task": "entail",
            "label": e.label,
            "answer": e.answer,
            "probabilities": {
                "entailment": e.probabilities[0],
                "contradiction": e.probabilities[1],
                "neutral": e.probabilities[2],
            },
            "exits": exits_json(&e.exits),
            "saved_fraction": e.cost.saved_fraction,
            "layer_reduction": e.cost.layer_reduction,
            "macs": {"executed": e.cost.macs_executed, "full": e.cost.macs_full},
        }),
    };
    v["thresholds"] = json!({"image": policy.image, "text": policy.text, "decoder": dec});
    v["batch_size"] = json!(done.batch_size);
    v["timings"] = json!({
        "queue_ms": done.queue_ms,
        "compute_ms": done.compute_ms,
        "total_ms": t0.elapsed().as_secs_f64() * 1e3,
    });
    Ok(Json(v))
}
