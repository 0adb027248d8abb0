//! `mue serve`: an HTTP API over the engine with dynamic batching on a worker thread.
//!
//! Routes: `POST /v1/caption`, `POST /v1/entail` (JSON or multipart), `GET /healthz`,
//! `GET /readyz`, `GET /metrics` (Prometheus text), `GET /` (demo page),
//! `GET /examples.json`, `GET /examples/{name}.png`.

pub mod client;
pub mod load;
pub mod metrics;
pub mod queue;

use crate::cli::{Task, TaskThresholds};
use crate::exit::{DecoderThreshold, MuePolicy};
use crate::generate::{Exits, SearchConfig};
use crate::pipeline::{Engine, EntailRequest, MAX_TEXT_CHARS};
use anyhow::Result;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, MatchedPath, Multipart, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use image::DynamicImage;
use metrics::Metrics;
use queue::{Job, JobInput, JobOutput, PushError, Queue};
use serde_json::{json, Value};
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// Server settings.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Most requests per engine call.
    pub max_batch: usize,
    /// How long the oldest queued request waits for others to join its batch.
    pub max_wait: Duration,
    /// Bound of the request queue (0 refuses every inference request with 503).
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
            examples_dir: crate::cli::demo::examples_dir(),
        }
    }
}

struct AppState {
    engine: Arc<Engine>,
    cfg: ServeConfig,
    queue: Arc<Queue>,
    metrics: Arc<Metrics>,
    ready: AtomicBool,
    /// Inference requests queued or being computed.
    in_flight: AtomicUsize,
}

type Shared = Arc<AppState>;

/// An error answer: status plus a JSON `{"error": ...}` body.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
        }
    }
    fn bad(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (self.status, Json(json!({ "error": self.message }))).into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        resp
    }
}

/// Serve on `listener` until `shutdown` resolves; then stop accepting, answer every
/// accepted request and stop the worker.
pub async fn run(
    listener: tokio::net::TcpListener,
    engine: Arc<Engine>,
    cfg: ServeConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    cfg.search.validate()?;
    if cfg.max_batch == 0 {
        anyhow::bail!("max batch must be at least 1");
    }
    let queue = Arc::new(Queue::new(cfg.queue));
    let max_layers = engine
        .model
        .cfg
        .encoder_layers
        .max(engine.model.cfg.decoder_layers);
    let metrics = Arc::new(Metrics::new(max_layers));
    let worker = {
        let (engine, queue, metrics) = (engine.clone(), queue.clone(), metrics.clone());
        let (max_batch, max_wait, search) = (cfg.max_batch, cfg.max_wait, cfg.search);
        std::thread::Builder::new()
            .name("mue-batcher".into())
            .spawn(move || queue::worker(engine, queue, metrics, max_batch, max_wait, search))?
    };
    let state = Arc::new(AppState {
        engine,
        cfg,
        queue: queue.clone(),
        metrics,
        ready: AtomicBool::new(true),
        in_flight: AtomicUsize::new(0),
    });
    let app = router(state.clone());
    let st = state.clone();
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            shutdown.await;
            st.ready.store(false, Ordering::SeqCst);
            tracing::info!("shutting down: finishing accepted requests");
        })
        .await;
    queue.close();
    tokio::task::spawn_blocking(move || worker.join())
        .await?
        .map_err(|_| anyhow::anyhow!("batching worker panicked"))?;
    served?;
    Ok(())
}

/// A server running in the background (for tests and benchmarks).
pub struct Server {
    pub addr: std::net::SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<()>>,
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

    /// Graceful shutdown; waits until accepted requests are answered.
    pub async fn shutdown(mut self) -> Result<()> {
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
        .layer(DefaultBodyLimit::max(limit))
        .layer(middleware::from_fn_with_state(state.clone(), track))
        .with_state(state)
}

async fn track(State(st): State<Shared>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".to_string());
    let t = Instant::now();
    let resp = next.run(req).await;
    st.metrics
        .observe_request(&route, resp.status().as_u16(), t.elapsed().as_secs_f64());
    resp
}

async fn index() -> Html<&'static str> {
    Html(include_str!("page.html"))
}

async fn readyz(State(st): State<Shared>) -> Response {
    if st.ready.load(Ordering::SeqCst) {
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
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}

async fn examples_json(State(st): State<Shared>) -> Response {
    match std::fs::read(st.cfg.examples_dir.join("examples.json")) {
        Ok(b) => ([(header::CONTENT_TYPE, "application/json")], b).into_response(),
        Err(_) => ApiError::new(StatusCode::NOT_FOUND, "no examples").into_response(),
    }
}

async fn example_png(
    State(st): State<Shared>,
    axum::extract::Path(name): axum::extract::Path<String>,
) -> Response {
    let stem = name.strip_suffix(".png").unwrap_or("");
    let safe = !stem.is_empty()
        && stem
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if !safe {
        return ApiError::new(StatusCode::NOT_FOUND, "no such example").into_response();
    }
    match std::fs::read(st.cfg.examples_dir.join(&name)) {
        Ok(b) => ([(header::CONTENT_TYPE, "image/png")], b).into_response(),
        Err(_) => ApiError::new(StatusCode::NOT_FOUND, "no such example").into_response(),
    }
}

/// A parsed request body, before validation.
#[derive(Default)]
struct Fields {
    image: Option<Vec<u8>>,
    hypothesis: Option<String>,
    premise: Option<String>,
    /// (field name, raw value) per stream: image, text, decoder.
    exits: [Option<Value>; 3],
}

const EXIT_NAMES: [&str; 3] = ["image", "text", "decoder"];

async fn read_fields(st: &Shared, req: Request) -> Result<Fields, ApiError> {
    let ctype = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    let mut f = Fields::default();
    if ctype.starts_with("multipart/form-data") {
        let mut mp = Multipart::from_request(req, st)
            .await
            .map_err(|e| ApiError::new(e.status(), e.body_text()))?;
        loop {
            let field = match mp.next_field().await {
                Ok(Some(field)) => field,
                Ok(None) => break,
                Err(e) => return Err(ApiError::new(e.status(), e.body_text())),
            };
            let name = field.name().unwrap_or("").to_string();
            let data = field
                .bytes()
                .await
                .map_err(|e| ApiError::new(e.status(), e.body_text()))?;
            let text = || {
                String::from_utf8(data.to_vec())
                    .map_err(|_| ApiError::bad(format!("{name}: not UTF-8 text")))
            };
            match name.as_str() {
                "image" => f.image = Some(data.to_vec()),
                "hypothesis" => f.hypothesis = Some(text()?),
                "premise" => f.premise = Some(text()?),
                other => {
                    if let Some(i) = EXIT_NAMES
                        .iter()
                        .position(|s| other == format!("exits.{s}"))
                    {
                        let t = text()?;
                        let v = t.trim().parse::<f64>().map_err(|_| {
                            ApiError::bad(format!("{other} must be a number, got {t:?}"))
                        })?;
                        f.exits[i] = Some(json!(v));
                    }
                }
            }
        }
    } else {
        let body = Bytes::from_request(req, st)
            .await
            .map_err(|e| ApiError::new(e.status(), e.body_text()))?;
        let v: Value = serde_json::from_slice(&body)
            .map_err(|e| ApiError::bad(format!("body is not valid JSON: {e}")))?;
        let Value::Object(obj) = v else {
            return Err(ApiError::bad("body must be a JSON object"));
        };
        let string = |key: &str| -> Result<Option<String>, ApiError> {
            match obj.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.clone())),
                Some(_) => Err(ApiError::bad(format!("{key} must be a string"))),
            }
        };
        if let Some(b64) = string("image_base64")? {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(b64.trim())
                .map_err(|e| ApiError::bad(format!("image_base64: invalid base64 ({e})")))?;
            f.image = Some(bytes);
        }
        f.hypothesis = string("hypothesis")?;
        f.premise = string("premise")?;
        match obj.get("exits") {
            None | Some(Value::Null) => {}
            Some(Value::Object(ex)) => {
                for (i, s) in EXIT_NAMES.iter().enumerate() {
                    f.exits[i] = ex.get(*s).cloned().filter(|v| !v.is_null());
                }
                if let Some(k) = ex.keys().find(|k| !EXIT_NAMES.contains(&k.as_str())) {
                    return Err(ApiError::bad(format!(
                        "exits.{k}: unknown field (expected image, text, decoder)"
                    )));
                }
            }
            Some(_) => return Err(ApiError::bad("exits must be an object")),
        }
    }
    Ok(f)
}

/// Decode an image with size limits; errors name the `image` field.
pub fn decode_image(bytes: &[u8], max_side: u32) -> Result<DynamicImage, String> {
    if bytes.is_empty() {
        return Err("image: empty".into());
    }
    let mut reader = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| format!("image: cannot read ({e})"))?;
    if reader.format().is_none() {
        return Err("image: corrupt or unsupported format (PNG or JPEG expected)".into());
    }
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(max_side);
    limits.max_image_height = Some(max_side);
    reader.limits(limits);
    let img = reader.decode().map_err(|e| match e {
        image::ImageError::Limits(_) => {
            format!("image: larger than the limit of {max_side}x{max_side} pixels")
        }
        e => format!("image: corrupt ({e})"),
    })?;
    if img.width() == 0 || img.height() == 0 {
        return Err("image: zero size".into());
    }
    Ok(img)
}

/// Exit thresholds of a request over the task's defaults; each must be finite in [-2, 2].
fn policy_of(raw: &[Option<Value>; 3], base: MuePolicy) -> Result<MuePolicy, ApiError> {
    let base_dec = match base.decoder {
        DecoderThreshold::Constant { tau } | DecoderThreshold::Calm { tau, .. } => tau,
    };
    let mut vals = [base.image, base.text, base_dec];
    for (i, r) in raw.iter().enumerate() {
        let Some(v) = r else { continue };
        let name = EXIT_NAMES[i];
        let x = v
            .as_f64()
            .ok_or_else(|| ApiError::bad(format!("exits.{name} must be a number")))?;
        if !x.is_finite() || !(-2.0..=2.0).contains(&x) {
            return Err(ApiError::bad(format!(
                "exits.{name} must be a finite number in [-2, 2], got {x}"
            )));
        }
        vals[i] = x as f32;
    }
    if raw.iter().all(|r| r.is_none()) {
        return Ok(base);
    }
    let p = MuePolicy::new(vals[0], vals[1], vals[2]).map_err(|e| ApiError::bad(e.to_string()))?;
    Ok(match (raw[2].is_none(), base.decoder) {
        (true, d) => MuePolicy { decoder: d, ..p },
        _ => p,
    })
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
    let f = read_fields(&st, req).await?;
    let bytes = f
        .image
        .ok_or_else(|| ApiError::bad("image: missing (image_base64 in JSON, or an image part)"))?;
    let policy = policy_of(&f.exits, st.cfg.thresholds.get(task))?;
    let max_side = st.cfg.max_image_side;
    let image = tokio::task::spawn_blocking(move || decode_image(&bytes, max_side))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(ApiError::bad)?;
    let input = match task {
        Task::Caption => JobInput::Caption(image),
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
            JobInput::Entail(EntailRequest {
                image,
                hypothesis: hyp,
                premise: f.premise,
            })
        }
    };
    let (tx, rx) = oneshot::channel();
    let job = Job {
        input,
        policy,
        enqueued: Instant::now(),
        reply: tx,
    };
    if let Err((why, _)) = st.queue.push(job) {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            match why {
                PushError::Full => "queue is full, retry later",
                PushError::Closed => "server is shutting down",
            },
        ));
    }
    let waited = {
        // Decrements also when the client disconnects and this future is dropped.
        let _guard = InFlight::enter(&st.in_flight);
        tokio::time::timeout(st.cfg.timeout, rx).await
    };
    let done = match waited {
        Err(_) => {
            return Err(ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                format!("request timed out after {} ms", st.cfg.timeout.as_millis()),
            ))
        }
        Ok(Err(_)) => {
            return Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "worker dropped the request",
            ))
        }
        Ok(Ok(d)) => d,
    };
    let out = done
        .output
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e))?;
    let dec = match policy.decoder {
        DecoderThreshold::Constant { tau } | DecoderThreshold::Calm { tau, .. } => tau,
    };
    let mut v = match &out {
        JobOutput::Caption(c) => json!({
            "task": "caption",
            "caption": c.caption,
            "tokens": c.tokens,
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
