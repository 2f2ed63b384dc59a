//! `deltazip serve` on loopback with a tiny seeded Llama family and deltas in multi-tenant mode, under
//! a GPU delta budget that holds one delta at a time (every switch between fine-tunes evicts and
//! reloads): generation per fine-tune (deterministic, differing from the base), streaming, hot load and
//! unload, auth, path traversal, bad requests, metrics, and a bounded concurrent load test (200 requests).
//!
//! One server per process (the host's admission hook is process-wide), so one test function.

mod common;

use std::net::SocketAddr;

use common::{http, json_of};

use deltazip::serve::{start, ServeArgs};
use serde_json::{json, Value};

const KEY: &str = "test-key-123";

/// Greedy completion text of `model` (a new request, nothing else in flight).
fn complete(addr: SocketAddr, model: &str, prompt: &str) -> (u16, Value) {
    let body = json!({ "model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0.0, "top_k": 1 });
    let (status, text) = http(
        addr,
        "POST",
        "/v1/completions",
        Some(&body.to_string()),
        Some(KEY),
    );
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

fn text_of(v: &Value) -> String {
    v["choices"][0]["text"]
        .as_str()
        .unwrap_or_else(|| panic!("no completion text: {v}"))
        .to_string()
}

/// The tiny family, its deltas and a running server (keep the directory alive with it).
fn setup() -> (
    tempfile::TempDir,
    deltazip::serve::Running,
    std::path::PathBuf,
) {
    // The forward-pass profile on (read when the server builds its registry): /metrics shows it. This
    // binary's only test, so no other test sees the variable.
    std::env::set_var("DZ_PROFILE", "1");
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let deltas = root.join("deltas");
    let family = common::family_with_deltas(root, 2, &deltas);
    let one_delta = std::fs::metadata(deltas.join("ft-0.dz")).unwrap().len();
    let config = root.join("serve.toml");
    std::fs::write(
        &config,
        format!(
            "[base]\npath = {:?}\ndtype = \"f32\"\nname = \"base\"\n\
             [[delta]]\nname = \"ft-0\"\npath = \"deltas/ft-0.dz\"\n\
             [[delta]]\nname = \"ft-1\"\npath = \"deltas/ft-1.dz\"\n\
             [runtime]\ndevice = \"cpu\"\ngpu_delta_bytes = {}\ncpu_cache_bytes = {}\n\
             [scheduler]\nmax_seqs = 8\nmax_deltas_per_step = 2\n",
            family.base,
            // Room for one delta's device form at a time (f32 small tensors make it a bit larger).
            one_delta * 3 / 2,
            one_delta * 3,
        ),
    )
    .unwrap();
    let server = start(&ServeArgs {
        api_key: Some(KEY.to_string()),
        delta_dir: Some(deltas.clone()),
        ..ServeArgs::loopback(config)
    })
    .expect("server starts");
    (dir, server, deltas)
}

#[test]
fn server_end_to_end() {
    let (_dir, server, deltas) = setup();
    let addr = server.addr;

    // Health needs no key; everything else does.
    assert_eq!(http(addr, "GET", "/health", None, None).0, 200);
    assert_eq!(http(addr, "GET", "/v1/models", None, None).0, 401);
    assert_eq!(http(addr, "GET", "/v1/models", None, Some("wrong")).0, 401);
    let (status, body) = http(addr, "GET", "/v1/models", None, Some(KEY));
    assert_eq!(status, 200, "{body}");
    let ids: Vec<String> = json_of(&body)["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids, ["base", "ft-0", "ft-1"]);

    // Each fine-tune generates deterministically, and not like the base; switching between them
    // evicts and reloads (the budget holds one).
    let prompt = "def main():\n    ";
    let (s0, a0) = complete(addr, "ft-0", prompt);
    assert_eq!(s0, 200, "{a0}");
    let (_, a1) = complete(addr, "ft-1", prompt);
    let (_, b) = complete(addr, "base", prompt);
    let (_, a0_again) = complete(addr, "ft-0", prompt);
    assert_eq!(text_of(&a0), text_of(&a0_again), "ft-0 after an eviction");
    assert!(
        text_of(&a0) != text_of(&b) || text_of(&a1) != text_of(&b),
        "the fine-tunes generate like the base: vacuous test"
    );

    // Streaming: SSE chunks, then [DONE].
    let body = json!({ "model": "ft-1", "prompt": prompt, "max_tokens": 4, "stream": true, "temperature": 0.0 });
    let (status, text) = http(
        addr,
        "POST",
        "/v1/completions",
        Some(&body.to_string()),
        Some(KEY),
    );
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("data: "), "{text}");
    assert!(text.contains("[DONE]"), "{text}");

    // Bad requests get errors; the server stays up.
    let (status, text) = complete(addr, "no-such-model", prompt);
    assert_eq!(status, 404, "unknown model: {text}");
    assert!(
        text["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("\"no-such-model\" is not served")),
        "{text}"
    );
    let (status, _) = http(
        addr,
        "POST",
        "/v1/completions",
        Some("{not json"),
        Some(KEY),
    );
    assert!((400..500).contains(&status), "malformed JSON: {status}");
    assert_eq!(http(addr, "GET", "/health", None, None).0, 200);

    // Hot load: traversal and outside paths refused, a bad file refused, a good one served.
    let load = |name: &str, path: &str| {
        let body = json!({ "name": name, "path": path }).to_string();
        http(addr, "POST", "/v1/deltas", Some(&body), Some(KEY))
    };
    assert_eq!(load("x", "../serve.toml").0, 403);
    assert_eq!(load("x", "/etc/passwd").0, 403);
    std::fs::write(deltas.join("junk.dz"), b"not a delta").unwrap();
    let (status, text) = load("x", "junk.dz");
    assert_eq!(status, 400, "{text}");
    assert_eq!(load("ft-1", "ft-1.dz").0, 409, "duplicate name");
    let (status, text) = load("ft-0b", "ft-0.dz");
    assert_eq!(status, 201, "{text}");
    let (s, hot) = complete(addr, "ft-0b", prompt);
    assert_eq!(s, 200, "{hot}");
    assert_eq!(
        text_of(&hot),
        text_of(&a0),
        "the same delta under another name"
    );
    let (_, body) = http(addr, "GET", "/v1/models", None, Some(KEY));
    assert!(body.contains("\"ft-0b\""), "{body}");

    // Unload: the name stops being served; an unknown name is 404.
    let (status, text) = http(addr, "DELETE", "/v1/deltas/ft-0b", None, Some(KEY));
    assert_eq!(status, 200, "{text}");
    let (status, text) = complete(addr, "ft-0b", prompt);
    assert_eq!(status, 404, "unloaded delta still served: {text}");
    assert_eq!(
        http(addr, "DELETE", "/v1/deltas/nope", None, Some(KEY)).0,
        404
    );

    // A bounded concurrent load: 200 requests over both fine-tunes and the base, 50 at a time, each
    // answered with what it gets alone (batched rows of different fine-tunes, evictions included).
    let (errors, mismatches) = concurrent_load(addr);
    assert_eq!(errors, 0, "errors under concurrent load");
    assert_eq!(
        mismatches, 0,
        "{mismatches} of 200 concurrent responses differ from the same request alone"
    );

    // Metrics: tiers, requests, tokens, GPU bytes.
    let (status, text) = http(addr, "GET", "/metrics", None, Some(KEY));
    assert_eq!(status, 200);
    for needle in [
        "deltazip_delta_hits_total{tier=\"gpu\"}",
        "deltazip_delta_evictions_total",
        "deltazip_requests_total{route=\"/v1/completions\",status=\"200\"}",
        "deltazip_tokens_total{model=\"ft-1\"}",
        "deltazip_gpu_delta_bytes{kind=\"budget\"}",
    ] {
        assert!(
            text.contains(needle),
            "{needle} missing from /metrics:\n{text}"
        );
    }
    // The profile (DZ_PROFILE=1): base and delta parts of the linear layers were timed, steps counted.
    let value = |prefix: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{prefix} missing from /metrics:\n{text}"))
    };
    assert!(value("deltazip_profile_calls_total{part=\"linear_delta\"}") > 0.0);
    assert!(value("deltazip_profile_calls_total{part=\"base_linear\"}") > 0.0);
    assert!(value("deltazip_profile_seconds_total{part=\"linear_delta\"}") > 0.0);
    // The prompts' steps (more than one token per sequence) count apart from the decode steps.
    assert!(value("deltazip_profile_calls_total{part=\"linear_delta_prefill\"}") > 0.0);
    assert!(value("deltazip_profile_calls_total{part=\"base_linear_prefill\"}") > 0.0);
    assert!(value("deltazip_profile_steps_total") > 0.0);
    let evictions: f64 = text
        .lines()
        .find(|l| l.starts_with("deltazip_delta_evictions_total{tier=\"gpu\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    assert!(
        evictions >= 1.0,
        "a one-delta budget never evicted:\n{text}"
    );
    streams_always_finish(addr);
    drop(server);
}

/// Every greedy stream ends with a finish reason and `data: [DONE]`, also when its text ends inside a
/// multi-byte character (byte-level tokens of the tiny model's tokenizer; host patch
/// `mistralrs-core/0007-stream-final-chunk-incomplete-utf8`), and carries the non-streamed text.
fn streams_always_finish(addr: SocketAddr) {
    let mut split_char = 0;
    for i in 1..=16 {
        let prompt = format!("hello world number {i} is");
        let body = |stream: bool| {
            json!({ "model": "base", "prompt": prompt, "max_tokens": 8 + i, "stream": stream,
                    "temperature": 0.0, "top_k": 1 })
            .to_string()
        };
        let (status, whole) = http(
            addr,
            "POST",
            "/v1/completions",
            Some(&body(false)),
            Some(KEY),
        );
        assert_eq!(status, 200, "{whole}");
        let whole = text_of(&json_of(&whole));
        split_char += usize::from(whole.ends_with('\u{FFFD}'));
        let (status, sse) = http(
            addr,
            "POST",
            "/v1/completions",
            Some(&body(true)),
            Some(KEY),
        );
        assert_eq!(status, 200, "{sse}");
        let events: Vec<&str> = sse
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .collect();
        assert_eq!(
            events.last(),
            Some(&"[DONE]"),
            "stream {i} did not finish:\n{sse}"
        );
        let chunks: Vec<Value> = events[..events.len() - 1]
            .iter()
            .map(|e| json_of(e))
            .collect();
        let last = chunks.last().expect("a chunk");
        assert_eq!(
            last["choices"][0]["finish_reason"], "length",
            "stream {i}: {last}"
        );
        let streamed: String = chunks
            .iter()
            .filter_map(|c| c["choices"][0]["text"].as_str())
            .collect();
        assert_eq!(streamed, whole, "stream {i}");
    }
    // The case the patch is for happened at least once.
    assert!(split_char >= 1, "no completion ended inside a character");
}

/// 200 greedy requests over both fine-tunes and the base, 50 clients at a time; returns the errors and
/// the responses that differ from the same request sent alone.
fn concurrent_load(addr: SocketAddr) -> (usize, usize) {
    let models = ["ft-0", "ft-1", "base"];
    let prompts = ["request one", "the second prompt"];
    let mut alone = std::collections::HashMap::new();
    for m in models {
        for p in prompts {
            let (status, v) = complete(addr, m, p);
            assert_eq!(status, 200, "{v}");
            alone.insert((m, p), text_of(&v));
        }
    }
    let alone = &alone;
    std::thread::scope(|sc| {
        let handles: Vec<_> = (0..50)
            .map(|t| {
                sc.spawn(move || {
                    let (mut errors, mut mismatches) = (0, 0);
                    for i in 0..4 {
                        let m = models[(t + i) % models.len()];
                        let p = prompts[(t / 3 + i) % prompts.len()];
                        match complete(addr, m, p) {
                            (200, v) => mismatches += usize::from(text_of(&v) != alone[&(m, p)]),
                            _ => errors += 1,
                        }
                    }
                    (errors, mismatches)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap())
            .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1))
    })
}
