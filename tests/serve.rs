//! `mue serve` over real HTTP on 127.0.0.1 with a random model.

use base64::Engine as _;
use mue::cli::demo::random_engine;
use mue::exit::MuePolicy;
use mue::generate::SearchConfig;
use mue::paths::examples_dir;
use mue::pipeline::{Engine, EntailRequest};
use mue::serve::client::{self, HttpResponse};
use mue::serve::{load, ServeConfig, Server};
use mue::task::{Task, TaskThresholds};
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn search() -> SearchConfig {
    SearchConfig {
        beam: 2,
        max_len: 6,
        ..SearchConfig::default()
    }
}

fn config() -> ServeConfig {
    ServeConfig {
        search: search(),
        max_wait: Duration::from_millis(5),
        ..ServeConfig::default()
    }
}

fn png_bytes() -> Vec<u8> {
    std::fs::read(examples_dir().join("example_0.png")).unwrap()
}

fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(b)
}

async fn start(cfg: ServeConfig) -> (Server, Arc<Engine>) {
    let engine = Arc::new(random_engine(0).unwrap());
    let server = Server::start("127.0.0.1:0", engine.clone(), cfg)
        .await
        .unwrap();
    (server, engine)
}

async fn post(addr: SocketAddr, path: &str, body: Value) -> HttpResponse {
    client::post_json(addr, path, &body).await.unwrap()
}

fn expect_400(r: &HttpResponse, needle: &str) {
    assert_eq!(r.status, 400, "{}", r.text());
    let msg = r.json().unwrap()["error"].as_str().unwrap().to_string();
    assert!(msg.contains(needle), "error {msg:?} should name {needle:?}");
}

fn layers(v: &Value) -> (u64, u64, Vec<u64>) {
    let e = &v["exits"];
    (
        e["image_layer"].as_u64().unwrap(),
        e["text_layer"].as_u64().unwrap(),
        e["token_layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap())
            .collect(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_answer_and_match_direct_engine_calls() {
    let (server, engine) = start(config()).await;
    let addr = server.addr;
    let png = png_bytes();
    let img = image::load_from_memory(&png).unwrap();

    // Plain routes.
    let r = client::get(addr, "/healthz").await.unwrap();
    assert_eq!((r.status, r.text().trim()), (200, "ok"));
    assert_eq!(client::get(addr, "/readyz").await.unwrap().status, 200);
    let page = client::get(addr, "/").await.unwrap();
    assert_eq!(page.status, 200);
    let html = page.text();
    assert!(html.contains("<script>") && html.contains("/v1/"));
    assert!(!html.contains("src=\"http") && !html.contains("href=\"http"));
    let ex = client::get(addr, "/examples/example_0.png").await.unwrap();
    assert_eq!(ex.status, 200);
    assert_eq!(ex.body, png);
    assert_eq!(ex.header("content-type"), Some("image/png"));
    let list = client::get(addr, "/examples.json").await.unwrap();
    assert!(!list.json().unwrap().as_array().unwrap().is_empty());
    for bad in [
        "/examples/..%2FCargo.toml",
        "/examples/missing.png",
        "/nope",
    ] {
        assert_eq!(client::get(addr, bad).await.unwrap().status, 404, "{bad}");
    }

    // Caption with the default thresholds equals a direct call.
    let r = post(addr, "/v1/caption", json!({"image_base64": b64(&png)})).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json().unwrap();
    let th = TaskThresholds::default();
    let direct = engine
        .caption(std::slice::from_ref(&img), &th.caption, &search())
        .unwrap()
        .remove(0);
    assert_eq!(v["caption"], json!(direct.caption));
    assert_eq!(v["tokens"], json!(direct.tokens));
    assert_eq!(
        layers(&v),
        (
            direct.exits.image_layer as u64,
            direct.exits.text_layer as u64,
            direct
                .exits
                .token_layers
                .iter()
                .map(|&x| x as u64)
                .collect()
        )
    );
    assert!((v["saved_fraction"].as_f64().unwrap() - direct.cost.saved_fraction).abs() < 1e-9);
    assert!(v["timings"]["queue_ms"].as_f64().unwrap() >= 0.0);
    assert!(v["timings"]["compute_ms"].as_f64().unwrap() > 0.0);

    // Entailment with per-request thresholds equals a direct call with that policy.
    let hyp = "there is a red circle";
    let r = post(
        addr,
        "/v1/entail",
        json!({"image_base64": b64(&png), "hypothesis": hyp,
               "exits": {"image": 0.5, "text": 0.9, "decoder": 0.8}}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json().unwrap();
    let policy = MuePolicy::new(0.5, 0.9, 0.8).unwrap();
    let req = EntailRequest {
        image: img.clone(),
        hypothesis: hyp.into(),
        premise: None,
    };
    let direct = engine.entail(&[req], &policy).unwrap().remove(0);
    assert_eq!(v["label"], json!(direct.label));
    assert_eq!(v["answer"], json!(direct.answer));
    for (k, p) in ["entailment", "contradiction", "neutral"]
        .iter()
        .zip(direct.probabilities)
    {
        assert!((v["probabilities"][k].as_f64().unwrap() - p as f64).abs() < 1e-6);
    }
    assert_eq!(v["exits"]["image_layer"], json!(direct.exits.image_layer));
    assert_eq!(v["exits"]["text_layer"], json!(direct.exits.text_layer));
    assert_eq!(v["thresholds"]["image"], json!(0.5f32));

    // Multipart, full depth: every stream runs every layer and matches a direct call.
    let (ct, body) = client::multipart(&[
        ("image", Some("x.png"), &png),
        ("exits.image", None, b"1"),
        ("exits.text", None, b"1.0"),
        ("exits.decoder", None, b"1"),
    ]);
    let r = client::request(addr, "POST", "/v1/caption", Some(&ct), &body)
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json().unwrap();
    let full = engine
        .caption(std::slice::from_ref(&img), &MuePolicy::never(), &search())
        .unwrap()
        .remove(0);
    assert_eq!(v["caption"], json!(full.caption));
    let (il, tl, toks) = layers(&v);
    let depth = engine.model.cfg.encoder_layers as u64;
    let dec = engine.model.cfg.decoder_layers as u64;
    assert_eq!((il, tl), (depth, depth));
    assert!(toks.iter().all(|&t| t == dec));
    assert_eq!(v["saved_fraction"].as_f64().unwrap(), 0.0);

    let (ct, body) = client::multipart(&[
        ("image", Some("x.png"), &png),
        ("hypothesis", None, hyp.as_bytes()),
    ]);
    let r = client::request(addr, "POST", "/v1/entail", Some(&ct), &body)
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let req = EntailRequest {
        image: img.clone(),
        hypothesis: hyp.into(),
        premise: None,
    };
    let direct = engine.entail(&[req], &th.entail).unwrap().remove(0);
    assert_eq!(r.json().unwrap()["label"], json!(direct.label));

    // Errors name the offending field.
    let r = post(
        addr,
        "/v1/caption",
        json!({"image_base64": "@@not base64@@"}),
    )
    .await;
    expect_400(&r, "image_base64");
    let r = post(
        addr,
        "/v1/caption",
        json!({"image_base64": b64(b"definitely not an image")}),
    )
    .await;
    expect_400(&r, "image");
    let r = post(
        addr,
        "/v1/caption",
        json!({"image_base64": b64(&png[..png.len() / 2])}),
    )
    .await;
    expect_400(&r, "image: corrupt");
    let mut big = Vec::new();
    image::DynamicImage::ImageLuma8(image::GrayImage::new(4097, 1))
        .write_to(&mut std::io::Cursor::new(&mut big), image::ImageFormat::Png)
        .unwrap();
    let r = post(addr, "/v1/caption", json!({"image_base64": b64(&big)})).await;
    expect_400(&r, "limit of 4096x4096");
    let r = post(addr, "/v1/caption", json!({})).await;
    expect_400(&r, "image: missing");
    let r = post(
        addr,
        "/v1/caption",
        json!({"image_base64": b64(&png), "exits": {"image": 3.0}}),
    )
    .await;
    expect_400(&r, "exits.image");
    let r = post(
        addr,
        "/v1/entail",
        json!({"image_base64": b64(&png), "hypothesis": hyp, "exits": {"decoder": -2.5}}),
    )
    .await;
    expect_400(&r, "exits.decoder");
    let r = post(
        addr,
        "/v1/caption",
        json!({"image_base64": b64(&png), "exits": {"text": "high"}}),
    )
    .await;
    expect_400(&r, "exits.text");
    let (ct, body) =
        client::multipart(&[("image", Some("x.png"), &png), ("exits.text", None, b"NaN")]);
    let r = client::request(addr, "POST", "/v1/caption", Some(&ct), &body)
        .await
        .unwrap();
    expect_400(&r, "exits.text");
    let r = post(
        addr,
        "/v1/entail",
        json!({"image_base64": b64(&png), "hypothesis": "   "}),
    )
    .await;
    expect_400(&r, "hypothesis");
    let r = post(addr, "/v1/entail", json!({"image_base64": b64(&png)})).await;
    expect_400(&r, "hypothesis");
    let r = client::request(
        addr,
        "POST",
        "/v1/caption",
        Some("application/json"),
        b"{oops",
    )
    .await
    .unwrap();
    expect_400(&r, "JSON");
    assert_eq!(client::get(addr, "/v1/caption").await.unwrap().status, 405);

    // Metrics reflect what happened.
    let m = client::get(addr, "/metrics").await.unwrap();
    assert_eq!(m.status, 200);
    let m = m.text();
    for needle in [
        "mue_requests_total{route=\"/v1/caption\",status=\"200\"} 2\n",
        "mue_requests_total{route=\"/v1/entail\",status=\"200\"} 2\n",
        "mue_requests_total{route=\"/v1/caption\",status=\"400\"} 9\n",
        "mue_requests_total{route=\"unmatched\",status=\"404\"} 1\n",
        "mue_request_duration_seconds_count{route=\"/v1/caption\"}",
        "mue_batch_size_count 4\n",
        "mue_exit_layer_count{stream=\"image\"} 4\n",
        "mue_exit_layer_bucket{stream=\"decoder\",le=\"+Inf\"}",
        "mue_queue_depth 0\n",
    ] {
        assert!(m.contains(needle), "metrics lack {needle:?}:\n{m}");
    }
    server.shutdown().await.unwrap();
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_limit_gives_413() {
    let (server, _) = start(ServeConfig {
        max_body: 2048,
        ..config()
    })
    .await;
    let big = json!({"image_base64": "A".repeat(8192)});
    let r = post(server.addr, "/v1/caption", big).await;
    assert_eq!(r.status, 413, "{}", r.text());
    let (ct, body) = client::multipart(&[("image", Some("x.png"), &vec![0u8; 8192])]);
    let r = client::request(server.addr, "POST", "/v1/caption", Some(&ct), &body)
        .await
        .unwrap();
    assert_eq!(r.status, 413, "{}", r.text());
    server.shutdown().await.unwrap();
}

/// The value of an unlabelled or labelled series in the metrics text.
fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no series {series} in:\n{text}"))
}

async fn metrics(addr: SocketAddr) -> String {
    client::get(addr, "/metrics").await.unwrap().text()
}

/// Polls the metrics until `series` reaches `want` (at most 100 x 50 ms).
async fn wait_metric(addr: SocketAddr, series: &str, want: f64) -> String {
    let mut m = String::new();
    for _ in 0..100 {
        m = metrics(addr).await;
        if metric(&m, series) >= want {
            return m;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{series} never reached {want}:\n{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_queue_gives_503_with_retry_after() {
    let cfg = ServeConfig {
        queue: 1,
        max_batch: 1,
        ..config()
    };
    cfg.hooks.stall_ms.store(1000, Ordering::SeqCst);
    let (server, _) = start(cfg).await;
    let addr = server.addr;
    let body = json!({"image_base64": b64(&png_bytes())});
    let first = {
        let body = body.clone();
        tokio::spawn(async move { client::post_json(addr, "/v1/caption", &body).await })
    };
    wait_metric(addr, "mue_admitted", 1.0).await;
    // The one slot is taken: refused at once, before the body is even parsed.
    let r = post(addr, "/v1/caption", body).await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r
        .header("retry-after")
        .is_some_and(|v| v.parse::<u64>().unwrap() >= 1));
    assert!(r.json().unwrap()["error"]
        .as_str()
        .unwrap()
        .contains("queue is full"));
    let r = post(addr, "/v1/caption", json!({"image_base64": "!"})).await;
    assert_eq!(r.status, 503, "admission comes before parsing");
    assert_eq!(first.await.unwrap().unwrap().status, 200);
    let m = metrics(addr).await;
    assert_eq!(
        metric(&m, "mue_requests_rejected_total{reason=\"queue_full\"}"),
        2.0
    );
    assert_eq!(metric(&m, "mue_admitted"), 0.0);
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeout_gives_504() {
    let (server, _) = start(ServeConfig {
        timeout: Duration::from_millis(1),
        max_wait: Duration::from_millis(50),
        ..config()
    })
    .await;
    let r = post(
        server.addr,
        "/v1/caption",
        json!({"image_base64": b64(&png_bytes())}),
    )
    .await;
    assert_eq!(r.status, 504, "{}", r.text());
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_requests_batch_by_task_and_exit_settings() {
    let (server, engine) = start(ServeConfig {
        max_wait: Duration::from_millis(300),
        max_batch: 8,
        ..config()
    })
    .await;
    let addr = server.addr;
    let png = png_bytes();
    let mut tasks = Vec::new();
    for i in 0..8 {
        // Two groups of four: default thresholds and full depth.
        let exits = if i % 2 == 0 {
            Value::Null
        } else {
            json!({"image": 1.0, "text": 1.0, "decoder": 1.0})
        };
        let body = json!({"image_base64": b64(&png), "exits": exits});
        tasks.push(tokio::spawn(async move {
            (
                i,
                client::post_json(addr, "/v1/caption", &body).await.unwrap(),
            )
        }));
    }
    let mut sizes = Vec::new();
    for t in tasks {
        let (i, r) = t.await.unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        let v = r.json().unwrap();
        let size = v["batch_size"].as_u64().unwrap();
        assert!(size <= 4, "groups must not mix exit settings (size {size})");
        sizes.push(size);
        let want_image = if i % 2 == 0 { 0.99f32 } else { 1.0 };
        assert_eq!(v["thresholds"]["image"], json!(want_image));
        if i % 2 == 1 {
            let depth = engine.model.cfg.encoder_layers as u64;
            assert_eq!(v["exits"]["image_layer"].as_u64().unwrap(), depth);
        }
    }
    assert!(sizes.iter().any(|&s| s > 1), "no batch formed: {sizes:?}");
    let m = client::get(addr, "/metrics").await.unwrap().text();
    let singles: u64 = m
        .lines()
        .find(|l| l.starts_with("mue_batch_size_bucket{le=\"1\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .unwrap()
        .parse()
        .unwrap();
    let batches: u64 = m
        .lines()
        .find(|l| l.starts_with("mue_batch_size_count"))
        .and_then(|l| l.rsplit(' ').next())
        .unwrap()
        .parse()
        .unwrap();
    assert!(batches < 8 && singles < batches, "{m}");
    assert!(m.contains("mue_batch_size_sum 8\n"), "{m}");
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shutdown_finishes_accepted_requests() {
    let (server, _) = start(ServeConfig {
        max_wait: Duration::from_millis(1500),
        ..config()
    })
    .await;
    let addr = server.addr;
    let body = json!({"image_base64": b64(&png_bytes())});
    let mut tasks = Vec::new();
    for _ in 0..3 {
        let body = body.clone();
        tasks.push(tokio::spawn(async move {
            client::post_json(addr, "/v1/caption", &body).await.unwrap()
        }));
    }
    // Wait until all three are accepted (the worker holds them for max_wait).
    let mut queued = false;
    for _ in 0..100 {
        let m = client::get(addr, "/metrics").await.unwrap().text();
        if m.contains("mue_requests_in_flight 3\n") {
            queued = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(queued, "requests never queued");
    server.shutdown().await.unwrap();
    for t in tasks {
        let r = t.await.unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
    }
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn load_test_reports() {
    let (server, _) = start(config()).await;
    let r = load::load_test(server.addr, 2, 6, Task::Entail)
        .await
        .unwrap();
    assert_eq!((r.requests, r.errors), (6, 0));
    assert!(r.throughput > 0.0 && r.p50 > 0.0 && r.p99 >= r.p50);
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn open_loop_overload_rejects_but_never_fails() {
    let spec = load::LoadSpec {
        concurrency: 1,
        requests: 1,
        task: Task::Entail,
        image: png_bytes(),
        hypothesis: "there is a red circle".into(),
        exits: None,
    };
    // Light load on a roomy queue: every request is answered.
    let (server, _) = start(config()).await;
    let r = load::open_loop(server.addr, &spec, 20.0, 0.5)
        .await
        .unwrap();
    assert_eq!((r.sent, r.ok, r.rejected, r.failed), (10, 10, 0, 0));
    assert!(r.p99 >= r.p50 && r.p50 > 0.0 && r.peak_rss_mib > 0.0);
    server.shutdown().await.unwrap();
    // A burst far above capacity on a 2-slot queue: refused with 503, accepted ones succeed.
    let cfg = ServeConfig {
        queue: 2,
        max_batch: 2,
        ..config()
    };
    let (server, _) = start(cfg).await;
    let r = load::open_loop(server.addr, &spec, 2000.0, 0.05)
        .await
        .unwrap();
    assert_eq!(r.sent, 100);
    assert_eq!(r.failed, 0, "{r:?}");
    assert_eq!(r.ok + r.rejected, r.sent);
    assert!(r.rejected > 0 && r.ok > 0, "{r:?}");
    server.shutdown().await.unwrap();
}

/// A raw loopback connection for clients that misbehave.
fn raw(addr: SocketAddr) -> std::net::TcpStream {
    let s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    s
}

/// True once the server has closed `s` (EOF or reset); reads any answer it sent first.
fn closed_by_server(s: &mut std::net::TcpStream) -> bool {
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                return false
            }
            Err(_) => return true,
        }
    }
}

/// Row 1: slow and idle connections are closed after the header timeout, the connection
/// cap holds, and /healthz answers again once they are gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_are_cut_and_connections_capped() {
    let (server, _) = start(ServeConfig {
        header_timeout: Duration::from_millis(300),
        max_connections: 4,
        ..config()
    })
    .await;
    let addr = server.addr;
    let cut_after = tokio::task::spawn_blocking(move || {
        // Three send a header one byte every 100 ms, one sends nothing at all.
        let mut conns: Vec<_> = (0..4).map(|_| raw(addr)).collect();
        for c in &mut conns[..3] {
            c.write_all(b"POST /v1/entail HTTP/1.1\r\nHost: x\r\n")
                .unwrap();
        }
        let t = Instant::now();
        let mut closed = vec![None; 4];
        for _ in 0..40 {
            std::thread::sleep(Duration::from_millis(100));
            for (i, c) in conns.iter_mut().enumerate() {
                if closed[i].is_some() {
                    continue;
                }
                if i < 3 {
                    let _ = c.write_all(b"X");
                }
                if closed_by_server(c) {
                    closed[i] = Some(t.elapsed());
                }
            }
            if closed.iter().all(|c| c.is_some()) {
                break;
            }
        }
        closed
    });
    // While the four hold every slot, a health check waits in the backlog; it is answered
    // once the header timeout has closed them.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let health = tokio::time::timeout(Duration::from_secs(5), client::get(addr, "/healthz"))
        .await
        .expect("healthz never answered")
        .unwrap();
    assert_eq!(health.status, 200);
    let closed = cut_after.await.unwrap();
    for (i, c) in closed.iter().enumerate() {
        let c = c.unwrap_or_else(|| panic!("connection {i} still open after 4 s"));
        assert!(c < Duration::from_secs(3), "connection {i} cut after {c:?}");
    }
    server.shutdown().await.unwrap();
}

/// Row 2: a half-sent request head and a half-sent body do not hold shutdown past the
/// drain bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_with_half_sent_requests_is_bounded() {
    let (server, _) = start(ServeConfig {
        header_timeout: Duration::from_secs(60),
        body_timeout: Duration::from_secs(60),
        drain_timeout: Duration::from_millis(500),
        ..config()
    })
    .await;
    let addr = server.addr;
    let mut head = raw(addr);
    head.write_all(b"POST /v1/entail HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    let mut body = raw(addr);
    body.write_all(
        b"POST /v1/entail HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"image_base64\": \"",
    )
    .unwrap();
    wait_metric(addr, "mue_admitted", 1.0).await;
    let t = Instant::now();
    let drained = tokio::time::timeout(Duration::from_secs(5), server.shutdown())
        .await
        .expect("shutdown not bounded")
        .unwrap();
    assert!(drained.cut >= 1, "{drained:?}");
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    assert!(closed_by_server(&mut head) || head.write_all(b"X\r\n\r\n").is_err());
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

fn png_of(img: image::DynamicImage) -> Vec<u8> {
    let mut out = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
        .unwrap();
    out
}

/// Row 3: the decode budget is checked from the header; a 16-bit RGBA 4096x4096 PNG is
/// refused before decoding, an image within the budget is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_decode_is_refused_from_the_header() {
    let huge = png_of(image::DynamicImage::ImageRgba16(image::ImageBuffer::new(
        4096, 4096,
    )));
    assert!(huge.len() < 2 << 20, "{} bytes", huge.len());
    let (server, _) = start(config()).await;
    let addr = server.addr;
    let r = post(addr, "/v1/caption", json!({"image_base64": b64(&huge)})).await;
    expect_400(&r, "decode budget of 128 MiB");
    assert!(r.text().contains("4 channels of 16 bits"), "{}", r.text());
    server.shutdown().await.unwrap();

    // A smaller budget: 512x512 RGB8 (0.75 + 0.75 MiB) fits in 2 MiB, RGBA16 (2 + 0.75) not.
    let (server, _) = start(ServeConfig {
        decode_budget: 2 << 20,
        ..config()
    })
    .await;
    let fits = png_of(image::DynamicImage::ImageRgb8(image::ImageBuffer::new(
        512, 512,
    )));
    let over = png_of(image::DynamicImage::ImageRgba16(image::ImageBuffer::new(
        512, 512,
    )));
    let r = post(
        server.addr,
        "/v1/caption",
        json!({"image_base64": b64(&fits)}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = post(
        server.addr,
        "/v1/caption",
        json!({"image_base64": b64(&over)}),
    )
    .await;
    expect_400(&r, "decode budget of 2 MiB");
    server.shutdown().await.unwrap();
}

/// Row 4: a multipart body shorter than its Content-Length is a 400 naming the body,
/// counted as a client error; nothing is counted as 500.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_multipart_is_a_client_error() {
    let (server, _) = start(config()).await;
    let addr = server.addr;
    let (ct, body) = client::multipart(&[("image", Some("x.png"), &png_bytes())]);
    let answer = tokio::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let head = format!(
            "POST /v1/caption HTTP/1.1\r\nHost: x\r\nContent-Type: {ct}\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        s.write_all(head.as_bytes()).unwrap();
        s.write_all(&body[..body.len() / 2]).unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    })
    .await
    .unwrap();
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("body: incomplete"), "{answer}");
    // Complete bytes but a multipart stream cut before its closing boundary: also 400.
    let (ct, body) = client::multipart(&[("image", Some("x.png"), &png_bytes())]);
    let cut = &body[..body.len() - 40];
    let r = client::request(addr, "POST", "/v1/caption", Some(&ct), cut)
        .await
        .unwrap();
    expect_400(&r, "multipart body");
    let m = metrics(addr).await;
    assert_eq!(
        metric(
            &m,
            "mue_requests_total{route=\"/v1/caption\",status=\"400\"}"
        ),
        2.0
    );
    assert!(!m.contains("status=\"500\""), "{m}");
    server.shutdown().await.unwrap();
}

/// Row 6: requests that expire while queued are dropped before compute and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn expired_requests_are_dropped_before_compute() {
    let cfg = ServeConfig {
        timeout: Duration::from_millis(200),
        max_batch: 1,
        ..config()
    };
    cfg.hooks.stall_ms.store(400, Ordering::SeqCst);
    let (server, _) = start(cfg).await;
    let addr = server.addr;
    let body = json!({"image_base64": b64(&png_bytes())});
    let mut tasks = Vec::new();
    for _ in 0..3 {
        let body = body.clone();
        tasks.push(tokio::spawn(async move {
            client::post_json(addr, "/v1/caption", &body).await.unwrap()
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap().status, 504);
    }
    let m = wait_metric(addr, "mue_requests_dropped_total{reason=\"expired\"}", 3.0).await;
    assert_eq!(metric(&m, "mue_batch_size_count"), 0.0, "nothing computed");
    assert_eq!(metric(&m, "mue_admitted"), 0.0);
    server.shutdown().await.unwrap();
}

/// Rows 6 and 7: with a slow engine, a burst over what the timeout allows is refused at
/// admission with 503 (estimated wait over the timeout) instead of timing out with 504.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn overload_is_refused_by_estimated_wait_not_timed_out() {
    let cfg = ServeConfig {
        timeout: Duration::from_millis(2900),
        max_batch: 1,
        max_wait: Duration::from_millis(1),
        ..config()
    };
    // About 1 s a batch: two fit in the timeout, a third not. The ~0.9 s of slack keeps an
    // admitted request from timing out (504) when a loaded machine slows the real compute.
    cfg.hooks.slow_ms.store(1000, Ordering::SeqCst);
    let (server, _) = start(cfg).await;
    let addr = server.addr;
    let body = json!({"image_base64": b64(&png_bytes())});
    // One request teaches the server how long a batch takes.
    assert_eq!(post(addr, "/v1/caption", body.clone()).await.status, 200);
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let body = body.clone();
        tasks.push(tokio::spawn(async move {
            client::post_json(addr, "/v1/caption", &body).await.unwrap()
        }));
    }
    let mut codes = Vec::new();
    for t in tasks {
        let r = t.await.unwrap();
        if r.status == 503 {
            let secs: u64 = r.header("retry-after").unwrap().parse().unwrap();
            assert!(secs >= 1);
            assert!(r.text().contains("estimated wait"), "{}", r.text());
        }
        codes.push(r.status);
    }
    assert!(codes.iter().all(|&c| c == 200 || c == 503), "{codes:?}");
    assert!(codes.contains(&200) && codes.contains(&503), "{codes:?}");
    let m = metrics(addr).await;
    assert!(metric(&m, "mue_requests_rejected_total{reason=\"wait\"}") >= 1.0);
    server.shutdown().await.unwrap();
}

/// Row 8: a panic in the batching worker answers that batch 500 without internals, is
/// counted, and the worker goes on; readiness stays true because it still runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_panic_is_supervised() {
    let cfg = config();
    cfg.hooks.panics.store(1, Ordering::SeqCst);
    let (server, _) = start(cfg).await;
    let addr = server.addr;
    let body = json!({"image_base64": b64(&png_bytes())});
    let r = post(addr, "/v1/caption", body.clone()).await;
    assert_eq!(r.status, 500);
    let msg = r.json().unwrap()["error"].as_str().unwrap().to_string();
    assert_eq!(msg, "internal error (details are in the server log)");
    assert_eq!(client::get(addr, "/readyz").await.unwrap().status, 200);
    assert_eq!(post(addr, "/v1/caption", body).await.status, 200);
    let m = metrics(addr).await;
    assert_eq!(metric(&m, "mue_worker_panics_total"), 1.0);
    assert_eq!(metric(&m, "mue_worker_up"), 1.0);
    server.shutdown().await.unwrap();
}

/// Row 9: executed and full-depth MACs per task add up the responses' figures.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_macs_per_task() {
    let (server, _) = start(config()).await;
    let addr = server.addr;
    let png = png_bytes();
    let (mut exec, mut full) = (0u64, 0u64);
    for exits in [
        json!(null),
        json!({"image": 0.5, "text": 0.5, "decoder": 0.5}),
    ] {
        let r = post(
            addr,
            "/v1/caption",
            json!({"image_base64": b64(&png), "exits": exits}),
        )
        .await;
        let v = r.json().unwrap();
        exec += v["macs"]["executed"].as_u64().unwrap();
        full += v["macs"]["full"].as_u64().unwrap();
    }
    let r = post(
        addr,
        "/v1/entail",
        json!({"image_base64": b64(&png), "hypothesis": "a red circle"}),
    )
    .await;
    let v = r.json().unwrap();
    let m = metrics(addr).await;
    assert_eq!(
        metric(&m, "mue_macs_executed_total{task=\"caption\"}"),
        exec as f64
    );
    assert_eq!(
        metric(&m, "mue_macs_full_total{task=\"caption\"}"),
        full as f64
    );
    assert_eq!(
        metric(&m, "mue_macs_executed_total{task=\"entail\"}"),
        v["macs"]["executed"].as_u64().unwrap() as f64
    );
    assert!(exec < full, "the 0.5 thresholds exit early");
    server.shutdown().await.unwrap();
}

/// Row 10: error bodies say what is wrong; base64 as people send it is accepted; unknown
/// fields are refused the same way in JSON and multipart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clear_errors_and_lenient_base64() {
    let (server, _) = start(ServeConfig {
        max_body: 64 * 1024,
        ..config()
    })
    .await;
    let addr = server.addr;
    let png = png_bytes();
    let r = client::get(addr, "/nope").await.unwrap();
    assert_eq!(r.status, 404);
    assert!(r.json().unwrap()["error"]
        .as_str()
        .unwrap()
        .contains("/nope"));
    let r = client::get(addr, "/v1/caption").await.unwrap();
    assert_eq!(r.status, 405);
    assert!(r.json().unwrap()["error"]
        .as_str()
        .unwrap()
        .contains("use POST"));
    let r = post(
        addr,
        "/v1/caption",
        json!({"image_base64": "A".repeat(70_000)}),
    )
    .await;
    assert_eq!(r.status, 413);
    assert!(r.text().contains("limit of 65536 bytes"), "{}", r.text());
    // MIME line-wrapped base64 and a data: URL.
    let wrapped: String = b64(&png)
        .as_bytes()
        .chunks(76)
        .map(|c| format!("{}\r\n", std::str::from_utf8(c).unwrap()))
        .collect();
    let plain = post(addr, "/v1/caption", json!({"image_base64": b64(&png)})).await;
    for enc in [wrapped, format!("data:image/png;base64,{}", b64(&png))] {
        let r = post(addr, "/v1/caption", json!({"image_base64": enc})).await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(
            r.json().unwrap()["caption"],
            plain.json().unwrap()["caption"]
        );
    }
    let r = post(
        addr,
        "/v1/caption",
        json!({"image_base64": "data:image/png,abc"}),
    )
    .await;
    expect_400(&r, "data URL must be base64");
    let r = post(
        addr,
        "/v1/caption",
        json!({"image_base64": b64(&png), "hypotesis": "x"}),
    )
    .await;
    expect_400(&r, "hypotesis: unknown field");
    let (ct, body) =
        client::multipart(&[("image", Some("x.png"), &png), ("threshold", None, b"1")]);
    let r = client::request(addr, "POST", "/v1/caption", Some(&ct), &body)
        .await
        .unwrap();
    expect_400(&r, "\"threshold\": unknown field");
    let fav = client::get(addr, "/favicon.ico").await.unwrap();
    assert_eq!(fav.status, 200);
    assert!(fav.text().starts_with("<svg"));
    server.shutdown().await.unwrap();
}

/// Row 5 and 10: settings that cannot work are refused before listening, naming the flag.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_settings_are_refused_before_listening() {
    let engine = random_engine(0).unwrap();
    let positions = engine.model.cfg.max_positions;
    let cases: Vec<(ServeConfig, &str)> = vec![
        (
            ServeConfig {
                queue: 0,
                ..config()
            },
            "--queue",
        ),
        (
            ServeConfig {
                timeout: Duration::ZERO,
                ..config()
            },
            "--timeout-ms",
        ),
        (
            ServeConfig {
                max_body: 0,
                ..config()
            },
            "--max-body",
        ),
        (
            ServeConfig {
                max_batch: 0,
                ..config()
            },
            "--max-batch",
        ),
        (
            ServeConfig {
                search: SearchConfig {
                    max_len: positions,
                    ..search()
                },
                ..config()
            },
            "--max-len",
        ),
    ];
    for (cfg, flag) in cases {
        let e = cfg.validate(&engine).unwrap_err().to_string();
        assert!(e.contains(flag), "{e:?} should name {flag}");
    }
    assert!(config().validate(&engine).is_ok());
}

fn mue_bin() -> std::process::Command {
    std::process::Command::new(env!("CARGO_BIN_EXE_mue"))
}

/// The binary: `--max-len 1000` and `--queue 0` fail before listening with a clear
/// message; SIGTERM with a half-sent request ends within the drain bound with a shutdown
/// line; stderr (a pipe, not a terminal) carries no ANSI colour codes.
#[test]
fn binary_validates_flags_and_drains_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    mue::cli::demo::write_random_model(dir.path(), 0).unwrap();
    for (flag, value, needle) in [
        (
            "--max-len",
            "1000",
            "--max-len 1000 is too long for this model",
        ),
        ("--queue", "0", "--queue must be at least 1"),
        ("--timeout-ms", "0", "--timeout-ms must be positive"),
    ] {
        let out = mue_bin()
            .args(["serve", "--addr", "127.0.0.1:0", "--model"])
            .arg(dir.path())
            .args([flag, value])
            .env("RUST_BACKTRACE", "1")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{flag} {value} accepted");
        assert!(err.contains(needle), "{err}");
        assert!(!err.contains("listening"), "{err}");
    }
    let mut child = mue_bin()
        .args([
            "serve",
            "--addr",
            "127.0.0.1:0",
            "--drain-ms",
            "500",
            "--model",
        ])
        .arg(dir.path())
        .env("RUST_LOG", "info")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    let mut log = Vec::new();
    let addr: SocketAddr = loop {
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("server did not start");
        log.push(line.clone());
        if let Some(a) = line.strip_prefix("mue serve: listening on http://") {
            break a.parse().unwrap();
        }
    };
    let mut half = std::net::TcpStream::connect(addr).unwrap();
    half.write_all(b"POST /v1/entail HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let t = Instant::now();
    let ok = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if t.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            panic!("server still running 10 s after SIGTERM: {log:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status:?}");
    while let Ok(l) = rx.recv_timeout(Duration::from_secs(2)) {
        log.push(l);
    }
    let text = log.join("\n");
    assert!(text.contains("mue serve: shutdown signal"), "{text}");
    assert!(text.contains("mue serve: stopped after draining"), "{text}");
    assert!(
        text.contains("INFO"),
        "RUST_LOG=info lines expected: {text}"
    );
    assert!(
        !text.contains('\x1b'),
        "ANSI escape codes in a pipe: {text:?}"
    );
}
