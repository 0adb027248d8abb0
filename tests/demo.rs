//! The shipped default model: it loads, and the demo's predictions, exit layers and
//! multiply-add counts match the recorded expectation (regenerate with
//! `cargo run --release -- demo --json --examples 2 > tests/data/demo_expected.json`
//! after retraining the model).

use std::process::Command;

fn stable(v: &serde_json::Value) -> serde_json::Value {
    // Wall times vary run to run; everything else is deterministic.
    match v {
        serde_json::Value::Object(m) => serde_json::Value::Object(
            m.iter()
                .filter(|(k, _)| k.as_str() != "wall_ms")
                .map(|(k, v)| (k.clone(), stable(v)))
                .collect(),
        ),
        serde_json::Value::Array(a) => serde_json::Value::Array(a.iter().map(stable).collect()),
        other => other.clone(),
    }
}

#[test]
fn shipped_model_demo_matches_recorded_output() {
    let out = Command::new(env!("CARGO_BIN_EXE_mue"))
        .args(["demo", "--json", "--examples", "2"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        !stderr.contains("RANDOM"),
        "the shipped model is missing: {stderr}"
    );
    let got: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/demo_expected.json");
    let want: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let (got, want) = (stable(&got), stable(&want));
    let g = got.as_array().unwrap();
    let w = want.as_array().unwrap();
    assert_eq!(g.len(), w.len());
    for (a, b) in g.iter().zip(w) {
        assert_eq!(a["image"], b["image"]);
        for side in ["mue", "full"] {
            let (ra, rb) = (&a["result"][side], &b["result"][side]);
            assert_eq!(ra["exits"], rb["exits"], "{side} exits on {}", a["image"]);
            assert_eq!(
                ra["caption"], rb["caption"],
                "{side} caption on {}",
                a["image"]
            );
            assert_eq!(ra["label"], rb["label"], "{side} label on {}", a["image"]);
            assert_eq!(ra["cost"]["macs_executed"], rb["cost"]["macs_executed"]);
            assert_eq!(ra["cost"]["macs_full"], rb["cost"]["macs_full"]);
            if let (Some(pa), Some(pb)) = (
                ra["probabilities"].as_array(),
                rb["probabilities"].as_array(),
            ) {
                for (x, y) in pa.iter().zip(pb) {
                    assert!((x.as_f64().unwrap() - y.as_f64().unwrap()).abs() < 1e-4);
                }
            }
        }
    }
}
