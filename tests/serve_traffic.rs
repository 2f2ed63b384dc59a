//! `deltazip serve` under traffic, on loopback with a tiny seeded Llama family: 4 deltas in the config
//! (`ft-0` .. `ft-3`, multi-tenant) under budgets smaller than the set (GPU room for 2 deltas, a CPU
//! cache for 3), and a fifth fine-tune hot-loaded as `victim` by the unload test.
//!
//! - Concurrent streaming clients across the 4 deltas and the base each get the tokens of the same
//!   request sent alone (while the budgets force evictions and reloads).
//! - Unloading a delta while requests for it are in flight is drain, then drop (src/serve.rs): every
//!   request that started before the unload finishes with the delta and answers the same tokens as
//!   alone, although the host's length bucketing sets sequences of other lengths aside between decode
//!   steps; a request that had not started (waiting for the delta's GPU room) is refused with 422
//!   `delta "victim" was unregistered` (streamed: as the stream's only event); a request sent after
//!   the unload gets 404. Requests for other deltas are untouched.
//!
//! One server for the process (the host's admission hook is process-wide); the tests take turns.

mod common;

use std::net::SocketAddr;
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::Duration;

use common::{complete, http, json_of, metric, metrics, wait_metrics, Answer};
use deltazip::serve::{start, Running, ServeArgs};
use serde_json::json;

const KEY: &str = "traffic-key";
const MODELS: [&str; 5] = ["ft-0", "ft-1", "ft-2", "ft-3", "base"];
const PROMPTS: [&str; 2] = ["The quick brown fox", "def main():\n    "];
/// Tokens of a long request: long enough to be still running when the test acts on it.
const LONG: usize = 64;
const LONG_PROMPT: &str = "Once upon a time, ";
const WAIT: Duration = Duration::from_secs(60);

/// A completion's answer, or its HTTP status and body.
type Reply = Result<Answer, (u16, String)>;

struct Server {
    addr: SocketAddr,
    _running: Running,
    _dir: tempfile::TempDir,
}

/// The shared server, and the lock the tests take turns with.
fn server() -> (std::sync::MutexGuard<'static, ()>, SocketAddr) {
    static TURN: Mutex<()> = Mutex::new(());
    static SERVER: OnceLock<Server> = OnceLock::new();
    let turn = TURN.lock().unwrap_or_else(PoisonError::into_inner);
    let s = SERVER.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let deltas = root.join("deltas");
        let family = common::family_with_deltas(root, 5, &deltas);
        // The budgets in the units the server counts: every delta of the family has the same size.
        let file = dz_format::DeltaFile::open(deltas.join("ft-0.dz")).unwrap();
        let one = dz_loader::HostDelta::read("ft-0", &file).unwrap();
        let cpu = candle_core::Device::Cpu; // the server below runs on the CPU
        let mut text = format!(
            "[base]\npath = {:?}\ndtype = \"f32\"\nname = \"base\"\n",
            family.base
        );
        for i in 0..4 {
            text += &format!("[[delta]]\nname = \"ft-{i}\"\npath = \"deltas/ft-{i}.dz\"\n");
        }
        // ft-0 once more, merged: a model with an engine of its own.
        text += "[[delta]]\nname = \"ft-0-merged\"\npath = \"deltas/ft-0.dz\"\nmode = \"merge\"\n";
        text += &format!(
            "[runtime]\ndevice = \"cpu\"\ngpu_delta_bytes = {}\ncpu_cache_bytes = {}\n\
             [scheduler]\nmax_seqs = 16\n",
            2 * one.device_bytes(&cpu) + one.device_bytes(&cpu) / 2,
            3 * one.bytes() + one.bytes() / 2,
        );
        let config = root.join("serve.toml");
        std::fs::write(&config, text).unwrap();
        let running = start(&ServeArgs {
            api_key: Some(KEY.to_string()),
            delta_dir: Some(deltas),
            ..ServeArgs::loopback(config)
        })
        .expect("server starts");
        Server {
            addr: running.addr,
            _running: running,
            _dir: dir,
        }
    });
    (turn, s.addr)
}

fn ok(addr: SocketAddr, model: &str, prompt: &str, max_tokens: usize, stream: bool) -> Answer {
    complete(addr, Some(KEY), model, prompt, max_tokens, stream)
        .unwrap_or_else(|(s, body)| panic!("{model}: HTTP {s}: {body}"))
}

fn gpu(text: &str, series: &str) -> f64 {
    metric(
        text,
        &format!("deltazip_delta_{series}_total{{tier=\"gpu\"}}"),
    )
}

fn admitted(text: &str) -> f64 {
    metric(text, "deltazip_scheduler_admitted_total")
}

/// An error body's message (`{"error": {"message"}}` or the host's `{"message"}`), else the body
/// as it is (a stream's lines).
fn message(body: &str) -> String {
    match serde_json::from_str::<serde_json::Value>(body) {
        Ok(v) => v["error"]["message"]
            .as_str()
            .or(v["message"].as_str())
            .unwrap_or(body)
            .to_string(),
        Err(_) => body.to_string(),
    }
}

fn model_ids(addr: SocketAddr) -> Vec<String> {
    let (status, body) = http(addr, "GET", "/v1/models", None, Some(KEY));
    assert_eq!(status, 200, "{body}");
    json_of(&body)["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn concurrent_streaming_clients_across_deltas_get_their_fine_tune_alone() {
    let (_turn, addr) = server();
    // Each (model, prompt) alone, one at a time.
    let mut alone = std::collections::HashMap::new();
    for m in MODELS {
        for p in PROMPTS {
            alone.insert((m, p), ok(addr, m, p, 8, true));
        }
    }
    let distinct: std::collections::HashSet<&str> = MODELS
        .iter()
        .map(|m| alone[&(*m, PROMPTS[0])].text.as_str())
        .collect();
    assert!(
        distinct.len() >= 3,
        "the fine-tunes generate alike: vacuous test ({alone:?})"
    );
    let before = metrics(addr, Some(KEY));

    // 20 streaming clients, 2 requests each, all models and prompts mixed.
    let alone = &alone;
    let results: Vec<(&str, &str, Reply)> = std::thread::scope(|sc| {
        let handles: Vec<_> = (0..20)
            .map(|t| {
                sc.spawn(move || {
                    (0..2)
                        .map(|i| {
                            let m = MODELS[(t + 2 * i) % MODELS.len()];
                            let p = PROMPTS[(t / MODELS.len() + i) % PROMPTS.len()];
                            (m, p, complete(addr, Some(KEY), m, p, 8, true))
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
    assert_eq!(results.len(), 40);
    for (m, p, r) in &results {
        match r {
            Ok(a) => assert_eq!(a, &alone[&(*m, *p)], "{m} {p:?} under concurrency"),
            Err((s, body)) => panic!("{m} {p:?}: HTTP {s}: {body}"),
        }
    }
    // GPU room for 2 of the 4 deltas: the mixed traffic evicted and uploaded again.
    let after = metrics(addr, Some(KEY));
    assert!(
        gpu(&after, "evictions") > gpu(&before, "evictions"),
        "no eviction under a 2-delta budget:\n{after}"
    );
    assert!(
        gpu(&after, "loads") >= gpu(&before, "loads") + 2.0,
        "no reload under a 2-delta budget:\n{after}"
    );
}

#[test]
fn unloading_a_delta_drains_started_requests_and_refuses_waiting_ones() {
    let (_turn, addr) = server();
    let load = || {
        let body = json!({ "name": "victim", "path": "ft-4.dz" }).to_string();
        http(addr, "POST", "/v1/deltas", Some(&body), Some(KEY))
    };
    let unload = || {
        let (status, body) = http(addr, "DELETE", "/v1/deltas/victim", None, Some(KEY));
        assert_eq!(status, 200, "{body}");
        json_of(&body)["status"].as_str().unwrap().to_string()
    };
    let (status, body) = load();
    assert_eq!(status, 201, "{body}");

    // References, alone: the victim and two other deltas run long (no end-of-text before LONG).
    let victim_alone = ok(addr, "victim", LONG_PROMPT, LONG, false);
    let victim_alone_streamed = ok(addr, "victim", LONG_PROMPT, LONG, true);
    assert_eq!(victim_alone.tokens, LONG as u64, "{victim_alone:?}");
    assert_eq!(victim_alone.text, victim_alone_streamed.text);
    // Streamed to its end: the final chunk says why, then [DONE] (what a drained stream must show).
    assert_eq!(
        victim_alone_streamed.finish.as_deref(),
        Some("length"),
        "{victim_alone_streamed:?}"
    );
    let long_alone: Vec<Answer> = ["ft-1", "ft-2"]
        .iter()
        .map(|m| ok(addr, m, LONG_PROMPT, LONG, false))
        .collect();
    assert!(long_alone.iter().all(|a| a.tokens == LONG as u64));
    assert_ne!(long_alone[0], victim_alone, "vacuous: the victim is ft-1");
    // A merged fine-tune too: its engine calls the (process-wide) admission hook for its own steps.
    let others = ["ft-1", "ft-2", "ft-3", "base", "ft-0-merged"];
    let others_alone: Vec<Answer> = others
        .iter()
        .map(|m| ok(addr, m, PROMPTS[0], 8, false))
        .collect();

    std::thread::scope(|sc| {
        // 1. Started requests drain: 3 victim requests admitted (started) when the DELETE comes all
        //    finish with the victim's tokens; other deltas' requests at the same time are untouched.
        //    They start at different steps, so they sit at different lengths and the host's bucketing
        //    runs one length per step and sets the others aside, in flight; the others' shorter
        //    prompts add more buckets.
        let start = admitted(&metrics(addr, Some(KEY)));
        let running: Vec<_> = (0..3)
            .map(|i| {
                sc.spawn(move || complete(addr, Some(KEY), "victim", LONG_PROMPT, LONG, i == 2))
            })
            .collect();
        wait_metrics(addr, Some(KEY), "3 victim requests admitted", WAIT, |t| {
            admitted(t) >= start + 3.0
        });
        let others_running: Vec<_> = others
            .iter()
            .map(|m| sc.spawn(move || complete(addr, Some(KEY), m, PROMPTS[0], 8, false)))
            .collect();
        assert_eq!(unload(), "draining", "the victim's sequences were running");
        // The merged engine steps while the victim drains (its steps must not unpin the victim).
        let merged_during =
            sc.spawn(move || complete(addr, Some(KEY), "ft-0-merged", PROMPTS[0], 8, false));
        // After the unload: a new request is 404, and the model is not listed.
        let (status, body) = complete(addr, Some(KEY), "victim", LONG_PROMPT, 4, false)
            .expect_err("a request for an unloaded delta");
        assert_eq!(status, 404, "{body}");
        assert!(
            message(&body).contains("\"victim\" is not served"),
            "{body}"
        );
        assert!(!model_ids(addr).contains(&"victim".to_string()));
        // Each runs to its end with the victim's tokens, streamed or not (a stream ends with its
        // final chunk and [DONE]), whether or not it was in the batch at every step after the unload.
        for (i, h) in running.into_iter().enumerate() {
            let want = if i == 2 {
                &victim_alone_streamed
            } else {
                &victim_alone
            };
            match h.join().unwrap() {
                Ok(got) => assert_eq!(&got, want, "victim request {i} after draining"),
                Err(e) => panic!("victim request {i}, started before the unload: {e:?}"),
            }
        }
        for ((m, h), want) in others.iter().zip(others_running).zip(&others_alone) {
            let got = h
                .join()
                .unwrap()
                .unwrap_or_else(|(s, b)| panic!("{m}: HTTP {s}: {b}"));
            assert_eq!(&got, want, "{m} during the unload");
        }
        let got = merged_during.join().unwrap().expect("ft-0-merged");
        assert_eq!(got, others_alone[4], "ft-0-merged while the victim drained");
    });

    // Once no generation request is open, the drained victim is dropped without any further request
    // (the engine is idle and runs no scheduling step that would drop it); then it can be loaded again
    // under the same name (409 while it still drains).
    let t0 = std::time::Instant::now();
    let (status, body) = loop {
        let (status, body) = load();
        if status != 409 || t0.elapsed() > WAIT {
            break (status, body);
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(
        status, 201,
        "the drained victim is dropped with no request open: {body}"
    );

    std::thread::scope(|sc| {
        // 2. Waiting requests are refused: ft-1 and ft-2 run long and fill the GPU room (2 deltas),
        //    so victim requests wait for room; the DELETE refuses them.
        let start = metrics(addr, Some(KEY));
        let long: Vec<_> = ["ft-1", "ft-2"]
            .iter()
            .map(|m| sc.spawn(move || complete(addr, Some(KEY), m, LONG_PROMPT, LONG, false)))
            .collect();
        let pinned =
            |t: &str, d: &str| metric(t, &format!("deltazip_delta_pinned{{delta=\"{d}\"}}"));
        wait_metrics(addr, Some(KEY), "ft-1 and ft-2 running", WAIT, |t| {
            admitted(t) >= admitted(&start) + 2.0
                && pinned(t, "ft-1") == 1.0
                && pinned(t, "ft-2") == 1.0
        });
        let deferred = |t: &str| metric(t, "deltazip_scheduler_deferred_total");
        let before = deferred(&metrics(addr, Some(KEY)));
        let waiting: Vec<_> = (0..3)
            .map(|i| {
                sc.spawn(move || complete(addr, Some(KEY), "victim", LONG_PROMPT, LONG, i == 2))
            })
            .collect();
        wait_metrics(addr, Some(KEY), "a victim request waiting", WAIT, |t| {
            deferred(t) > before
        });
        let others_during: Vec<_> = others
            .iter()
            .map(|m| sc.spawn(move || complete(addr, Some(KEY), m, PROMPTS[0], 8, false)))
            .collect();
        assert_eq!(unload(), "dropped", "no victim sequence was running");
        // Refused in the queue: 422 with the scheduler's reason, or, streamed, a 200 whose stream
        // carries the reason as its one data line; not yet past the model check: 404.
        let reason = |body: &str| message(body).contains("delta \"victim\" was unregistered");
        let mut refused = 0;
        for (i, h) in waiting.into_iter().enumerate() {
            match h.join().unwrap() {
                Err((422, body)) if i != 2 && reason(&body) => refused += 1,
                Err((200, body)) if i == 2 && reason(&body) => refused += 1,
                Err((404, body)) if message(&body).contains("\"victim\" is not served") => {}
                other => panic!("victim request {i} waiting at the unload: {other:?}"),
            }
        }
        assert!(refused >= 1, "no waiting victim request was refused");
        for ((m, h), want) in others.iter().zip(others_during).zip(&others_alone) {
            let got = h
                .join()
                .unwrap()
                .unwrap_or_else(|(s, b)| panic!("{m}: HTTP {s}: {b}"));
            assert_eq!(&got, want, "{m} during the unload");
        }
        for ((m, h), want) in ["ft-1", "ft-2"].iter().zip(long).zip(&long_alone) {
            let got = h
                .join()
                .unwrap()
                .unwrap_or_else(|(s, b)| panic!("{m}: HTTP {s}: {b}"));
            assert_eq!(&got, want, "{m} while the victim was unloaded");
        }
    });

    // Afterwards: not listed, 404, the others still right.
    assert!(!model_ids(addr).contains(&"victim".to_string()));
    let (status, body) = http(addr, "GET", "/v1/deltas", None, Some(KEY));
    assert!(status == 200 && !body.contains("victim"), "{body}");
    let (status, body) = complete(addr, Some(KEY), "victim", PROMPTS[0], 4, true)
        .expect_err("a request for an unloaded delta");
    assert_eq!(status, 404, "{body}");
    for (m, want) in others.iter().zip(&others_alone) {
        assert_eq!(
            &ok(addr, m, PROMPTS[0], 8, false),
            want,
            "{m} after the unload"
        );
    }
}

/// A merged fine-tune answers text completions with its own weights (the host's router sends every
/// completion to the default engine; `deltazip serve` routes them by model): the same tokens as the
/// same delta multi-tenant, and not the base's.
#[test]
fn merged_fine_tunes_answer_completions_with_their_own_weights() {
    let (_turn, addr) = server();
    let mut differs = false;
    for prompt in PROMPTS {
        for stream in [false, true] {
            let merged = ok(addr, "ft-0-merged", prompt, 12, stream);
            let multi = ok(addr, "ft-0", prompt, 12, stream);
            let base = ok(addr, "base", prompt, 12, stream);
            assert_eq!(
                merged.text, multi.text,
                "{prompt:?} stream={stream}: merged vs multi-tenant"
            );
            differs |= merged.text != base.text;
        }
    }
    assert!(differs, "the merged fine-tune answered as the base");
}
