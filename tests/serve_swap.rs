//! `deltazip serve` with the swap baseline (`mode = "swap"`) on loopback, tiny seeded Llama family:
//! two swap fine-tunes (and a third name over the first one's delta file) under
//! `swap_gpu_models = 1`, next to the same deltas merged and multi-tenant. Requests alternating between
//! the swap models each complete exactly like the merged model of the same delta, every switch swaps a
//! whole model in (the metrics count the loads, evictions and bytes), and a concurrent mix of swap,
//! multi-tenant, merged and base requests loses nothing and answers each as alone. `deltazip run`
//! serves a swap model too.
//!
//! One server per process (the host's admission hook is process-wide), so one test function.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use deltazip::run::{run, RunArgs};
use deltazip::serve::{start, ServeArgs};
use dz_compress::fixtures::{self, TinySpec};
use serde_json::{json, Value};

const PROMPT: &str = "def main():\n    ";
const MAX_TOKENS: usize = 8;

/// One HTTP/1.1 request (`Connection: close`); the status and the body.
fn http(addr: SocketAddr, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let body = body.unwrap_or("");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("read response");
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, rest) = text.split_once("\r\n\r\n").expect("a response head");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("a status code");
    assert!(
        !head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked"),
        "unexpected chunked response"
    );
    (status, rest.to_string())
}

/// Greedy completion text of `model`, or the status and body of a failure.
fn complete(addr: SocketAddr, model: &str, prompt: &str) -> Result<String, String> {
    let body = json!({ "model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0.0, "top_k": 1 });
    let (status, text) = http(addr, "POST", "/v1/completions", Some(&body.to_string()));
    if status != 200 {
        return Err(format!("{model}: {status} {text}"));
    }
    let v: Value = serde_json::from_str(&text).map_err(|e| format!("{e}: {text}"))?;
    v["choices"][0]["text"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| format!("no completion text: {v}"))
}

/// The value of the Prometheus series whose line starts with `series`.
fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(series))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{series} missing from /metrics:\n{text}"))
}

#[test]
fn swap_server_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let family = fixtures::write_family(&root.join("family"), &TinySpec::llama(), 2).unwrap();
    for (i, ft) in family.finetunes.iter().enumerate() {
        let out = root.join(format!("ft-{i}.dz"));
        fixtures::compress_rtn8(&family.base, ft, &out, &format!("ft-{i}")).expect("compress");
    }
    let config = root.join("serve.toml");
    std::fs::write(
        &config,
        format!(
            "[base]\npath = {:?}\ndtype = \"f32\"\nname = \"base\"\n\
             [[delta]]\nname = \"s0\"\npath = \"ft-0.dz\"\nmode = \"swap\"\n\
             [[delta]]\nname = \"s1\"\npath = \"ft-1.dz\"\nmode = \"swap\"\n\
             [[delta]]\nname = \"s0b\"\npath = \"ft-0.dz\"\nmode = \"swap\"\n\
             [[delta]]\nname = \"m0\"\npath = \"ft-0.dz\"\nmode = \"merge\"\n\
             [[delta]]\nname = \"m1\"\npath = \"ft-1.dz\"\nmode = \"merge\"\n\
             [[delta]]\nname = \"mt1\"\npath = \"ft-1.dz\"\n\
             [runtime]\ndevice = \"cpu\"\nswap_gpu_models = 1\n\
             [scheduler]\nmax_seqs = 8\n",
            family.base,
        ),
    )
    .unwrap();

    // `deltazip run` (before the server: the admission hook is process-wide) of the swap model and of
    // the merged models: the reference answers. (The host's HTTP completions route sends every request
    // to its default engine, the base's, so merged models, engines of their own, are not reachable over
    // HTTP; aliases of the base, multi-tenant and swap, are.)
    let by_run = |model: &str| {
        let out = run(&RunArgs {
            config: config.clone(),
            model: model.to_string(),
            prompt: PROMPT.to_string(),
            max_tokens: MAX_TOKENS,
        })
        .unwrap_or_else(|e| panic!("deltazip run of {model}: {e:#}"));
        out.strip_suffix('\n').unwrap_or(&out).to_string()
    };
    let m0 = by_run("m0");
    let m1 = by_run("m1");
    assert_eq!(by_run("s0"), m0, "deltazip run: swap vs merged");

    let server = start(&ServeArgs::loopback(config)).expect("server starts");
    let addr = server.addr;

    let (status, body) = http(addr, "GET", "/v1/models", None);
    assert_eq!(status, 200, "{body}");
    let models: Value = serde_json::from_str(&body).unwrap();
    let mut swap: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["deltazip"] == "swap")
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    swap.sort_unstable();
    assert_eq!(swap, ["s0", "s0b", "s1"], "{body}");

    // Alternating between two swap models with room for one: each answer is the merged model's.
    let base = complete(addr, "base", PROMPT).unwrap();
    assert!(
        m0 != base && m1 != base,
        "a fine-tune generates like the base: vacuous test ({m0:?} {m1:?} {base:?})"
    );
    for round in 0..2 {
        assert_eq!(
            complete(addr, "s0", PROMPT).unwrap(),
            m0,
            "s0, round {round}"
        );
        assert_eq!(
            complete(addr, "s1", PROMPT).unwrap(),
            m1,
            "s1, round {round}"
        );
    }
    let (_, text) = http(addr, "GET", "/metrics", None);
    let loads = metric(&text, "deltazip_swap_loads_total{tier=\"gpu\"}");
    let evictions = metric(&text, "deltazip_swap_evictions_total{tier=\"gpu\"}");
    assert!(
        loads >= 4.0,
        "4 alternating requests, {loads} swap-ins:\n{text}"
    );
    assert!(evictions >= 3.0, "{evictions} evictions:\n{text}");
    let model_bytes = metric(&text, "deltazip_swap_bytes_budget{tier=\"gpu\"}");
    assert!(model_bytes > 0.0);
    let copied = metric(&text, "deltazip_swap_copied_bytes_total");
    assert_eq!(
        copied,
        loads * model_bytes,
        "every swap-in copies a whole model"
    );
    assert!(metric(&text, "deltazip_swap_load_seconds_total{tier=\"gpu\"}") >= 0.0);
    // Two delta files in CPU memory, whatever the names over them.
    assert_eq!(
        metric(&text, "deltazip_swap_model_bytes{kind=\"cpu\"}"),
        2.0 * model_bytes
    );

    // A concurrent mix: nothing lost, every answer as alone.
    let mt1 = complete(addr, "mt1", PROMPT).unwrap();
    let want = |m: &str| match m {
        "s0" | "s0b" => m0.clone(),
        "s1" => m1.clone(),
        "mt1" => mt1.clone(),
        _ => base.clone(),
    };
    let mix = ["s0", "s1", "s0b", "mt1", "base", "s1", "s0b", "s0"];
    let outcomes: Vec<(String, Result<String, String>)> = std::thread::scope(|sc| {
        let handles: Vec<_> = (0..16)
            .map(|t| {
                sc.spawn(move || {
                    (0..3)
                        .map(|i| {
                            let m = mix[(t + i) % mix.len()];
                            (m.to_string(), complete(addr, m, PROMPT))
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    assert_eq!(outcomes.len(), 48);
    for (m, got) in &outcomes {
        match got {
            Ok(text) => assert_eq!(text, &want(m), "{m} under concurrent load"),
            Err(e) => panic!("a request failed under concurrent load: {e}"),
        }
    }
    let (_, text) = http(addr, "GET", "/metrics", None);
    assert!(metric(&text, "deltazip_swap_loads_total{tier=\"gpu\"}") > loads);
    assert!(metric(&text, "deltazip_tokens_total{model=\"s0b\"}") >= MAX_TOKENS as f64);
    assert!(metric(&text, "deltazip_tokens_total{model=\"mt1\"}") >= MAX_TOKENS as f64);
    // The delta tier is untouched by swap models, and is still there.
    assert!(metric(&text, "deltazip_delta_loads_total{tier=\"gpu\"}") >= 1.0);
    assert!(metric(&text, "deltazip_swap_scheduler_admitted_total") >= 40.0);
    drop(server);
}
