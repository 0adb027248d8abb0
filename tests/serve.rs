//! `mue serve` over real HTTP on 127.0.0.1 with a random model.

use base64::Engine as _;
use mue::cli::demo::{examples_dir, random_engine};
use mue::cli::{Task, TaskThresholds};
use mue::exit::MuePolicy;
use mue::generate::SearchConfig;
use mue::pipeline::{Engine, EntailRequest};
use mue::serve::client::{self, HttpResponse};
use mue::serve::{load, ServeConfig, Server};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

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
    assert!(list.json().unwrap().as_array().unwrap().len() >= 1);
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_queue_gives_503_with_retry_after() {
    let (server, _) = start(ServeConfig {
        queue: 0,
        ..config()
    })
    .await;
    let r = post(
        server.addr,
        "/v1/caption",
        json!({"image_base64": b64(&png_bytes())}),
    )
    .await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.header("retry-after"), Some("1"));
    // Validation still comes first.
    let r = post(server.addr, "/v1/caption", json!({"image_base64": "!"})).await;
    assert_eq!(r.status, 400);
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
