//! The engines baseline (issue #9, "swap" (a)): merge-mode fine-tunes as engines of their own under
//! `runtime.merged_gpu_models = 1`, unloaded and reloaded by the host (`MistralRs::unload_model` /
//! `reload_model`) on demand. Tiny seeded Llama family, three fine-tunes (and a fourth name over the
//! first one's delta file), on the CPU:
//! - through dz-loader's engine, requests alternating over the merged models give exactly the greedy
//!   tokens of each merged model loaded alone (no cap), and every switch is an unload and a reload;
//! - over HTTP (`deltazip serve`), the same alternation answers each as alone, `/metrics` counts the
//!   loads and unloads, and a concurrent mix of merged (streamed and not) and base requests loses
//!   nothing and answers each as alone; a reload that fails is a 503 with its reason, and the next
//!   request for that model is answered so at once.
//!
//! One server per process (the host's admission hook is process-wide), so one test function.

mod common;

use common::{complete, http, json_of, metric, metrics, Answer};
use deltazip::serve::{start, ServeArgs};

const PROMPT: &str = "def main():\n    ";
const MAX_TOKENS: usize = 8;

/// A request of the concurrent mix: its model, whether streamed, and what came back.
type Outcome = (String, bool, Result<Answer, (u16, String)>);

fn config(base: &std::path::Path, merged_dir: &std::path::Path, cap: Option<usize>) -> String {
    let cap = cap.map_or(String::new(), |k| format!("merged_gpu_models = {k}\n"));
    format!(
        "[base]\npath = {base:?}\ndtype = \"f32\"\nname = \"base\"\n\
         [[delta]]\nname = \"m0\"\npath = \"ft-0.dz\"\nmode = \"merge\"\n\
         [[delta]]\nname = \"m1\"\npath = \"ft-1.dz\"\nmode = \"merge\"\n\
         [[delta]]\nname = \"m2\"\npath = \"ft-2.dz\"\nmode = \"merge\"\n\
         [[delta]]\nname = \"m0b\"\npath = \"ft-0.dz\"\nmode = \"merge\"\n\
         [runtime]\ndevice = \"cpu\"\nmerged_dir = {merged_dir:?}\n{cap}\
         [scheduler]\nmax_seqs = 8\n"
    )
}

#[test]
fn merged_engines_under_a_cap() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let family = common::family_with_deltas(root, 3, root);
    let merged_dir = root.join("merged");
    let alone = root.join("alone.toml");
    std::fs::write(&alone, config(&family.base, &merged_dir, None)).unwrap();
    let capped = root.join("capped.toml");
    std::fs::write(&capped, config(&family.base, &merged_dir, Some(1))).unwrap();
    let prompt_ids: Vec<u32> = PROMPT.bytes().map(u32::from).collect();

    // The reference: every merged model loaded, each asked alone.
    let (c, d) = dz_loader::Config::load(&alone).unwrap();
    let served = dz_loader::serve(&c, &d).unwrap();
    assert!(served.engine_swap.is_none());
    let names = ["m0", "m1", "m2", "m0b"];
    let want_tokens: Vec<_> = names
        .iter()
        .map(|m| {
            served
                .engine
                .generate_tokens(m, &prompt_ids, MAX_TOKENS)
                .unwrap()
                .token_ids()
        })
        .collect();
    let want_text: Vec<String> = names
        .iter()
        .map(|m| served.engine.generate(m, PROMPT, MAX_TOKENS).unwrap().text)
        .collect();
    let base_text = served
        .engine
        .generate("base", PROMPT, MAX_TOKENS)
        .unwrap()
        .text;
    drop(served);
    assert_eq!(want_text[0], want_text[3], "two names over one file");
    assert!(
        want_text[..3].iter().all(|t| *t != base_text) && want_text[0] != want_text[1],
        "fine-tunes generate alike or like the base: vacuous test ({want_text:?} {base_text:?})"
    );
    // One directory per delta file: m0b shares m0's.
    let dirs = std::fs::read_dir(&merged_dir).unwrap().count();
    assert_eq!(dirs, 3, "merged directories");

    // Under the cap, through dz-loader's engine: the same greedy tokens, a reload per switch.
    {
        let (c, d) = dz_loader::Config::load(&capped).unwrap();
        let served = dz_loader::serve(&c, &d).unwrap();
        let swap = served.engine_swap.clone().expect("an engine swap");
        assert_eq!(
            swap.loaded(),
            ["m0"],
            "the first merged model starts loaded"
        );
        for round in 0..2 {
            for (i, m) in names.iter().enumerate() {
                let got = served
                    .engine
                    .generate_tokens(m, &prompt_ids, MAX_TOKENS)
                    .unwrap()
                    .token_ids();
                assert_eq!(got, want_tokens[i], "{m}, round {round}");
                assert_eq!(swap.loaded(), [*m], "one engine loaded");
            }
        }
        let st = swap.stats();
        // m0 (loaded), m1, m2, m0b; m0, m1, m2, m0b: 7 switches.
        assert_eq!((st.loads, st.unloads, st.loaded), (7, 7, 1), "{st:?}");
        // The base is not under the cap.
        let base = served.engine.generate("base", PROMPT, MAX_TOKENS).unwrap();
        assert_eq!(base.text, base_text);
    }

    let server = start(&ServeArgs::loopback(capped)).expect("server starts");
    let addr = server.addr;
    let (status, body) = http(addr, "GET", "/v1/models", None, None);
    assert_eq!(status, 200, "{body}");
    let mut merged: Vec<String> = json_of(&body)["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["deltazip"] == "merged")
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect();
    merged.sort_unstable();
    assert_eq!(merged, ["m0", "m0b", "m1", "m2"], "{body}");

    let want = |m: &str| -> String {
        names
            .iter()
            .position(|n| *n == m)
            .map_or(base_text.clone(), |i| want_text[i].clone())
    };
    let ask = |m: &str, stream: bool| -> Answer {
        complete(addr, None, m, PROMPT, MAX_TOKENS, stream)
            .unwrap_or_else(|(s, b)| panic!("{m} (stream {stream}): {s} {b}"))
    };
    // Alternating with room for one engine: every answer as alone, every switch a reload.
    for round in 0..2 {
        for m in ["m0", "m1", "m2"] {
            assert_eq!(ask(m, round == 1).text, want(m), "{m}, round {round}");
        }
    }
    let text = metrics(addr, None);
    let loads = metric(&text, "deltazip_engine_swap_loads_total");
    let unloads = metric(&text, "deltazip_engine_swap_unloads_total");
    // m0 starts loaded: m1, m2, m0, m1, m2.
    assert_eq!((loads, unloads), (5.0, 5.0), "{text}");
    assert_eq!(metric(&text, "deltazip_engine_swap_loaded_models"), 1.0);
    assert_eq!(metric(&text, "deltazip_engine_swap_capacity"), 1.0);
    assert_eq!(metric(&text, "deltazip_engine_swap_models"), 4.0);
    assert!(metric(&text, "deltazip_engine_swap_load_seconds_total") > 0.0);
    assert!(metric(&text, "deltazip_engine_swap_unload_seconds_total") > 0.0);
    assert_eq!(
        metric(&text, "deltazip_engine_swap_load_failures_total"),
        0.0
    );

    // A concurrent mix, streamed and not: nothing lost, every answer as alone.
    let mix = ["m0", "m1", "base", "m2", "m0b", "m1", "m0", "m2"];
    let outcomes: Vec<Outcome> = std::thread::scope(|sc| {
        let handles: Vec<_> = (0..12)
            .map(|t| {
                sc.spawn(move || {
                    (0..3)
                        .map(|i| {
                            let m = mix[(t + i) % mix.len()];
                            let stream = (t + i) % 3 == 0;
                            (
                                m.to_string(),
                                stream,
                                complete(addr, None, m, PROMPT, MAX_TOKENS, stream),
                            )
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
    assert_eq!(outcomes.len(), 36);
    for (m, stream, got) in &outcomes {
        match got {
            Ok(a) => assert_eq!(
                a.text,
                want(m),
                "{m} (stream {stream}) under concurrent load"
            ),
            Err((s, b)) => panic!("{m} (stream {stream}) failed under concurrent load: {s} {b}"),
        }
    }
    let text = metrics(addr, None);
    assert!(
        metric(&text, "deltazip_engine_swap_loads_total") > loads,
        "{text}"
    );
    assert_eq!(metric(&text, "deltazip_engine_swap_waiting_requests"), 0.0);
    assert_eq!(metric(&text, "deltazip_engine_swap_loaded_models"), 1.0);
    let errors: f64 = text
        .lines()
        .filter(|l| l.starts_with("deltazip_requests_total{route=\"/v1/completions\""))
        .filter(|l| !l.contains("status=\"200\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(errors, 0.0, "{text}");

    // Reloads that fail (the merged weights gone): 503 with the host's reason, and a new request for
    // the same model within the retry delay is answered at once, without another load.
    for dir in std::fs::read_dir(&merged_dir).unwrap() {
        for entry in std::fs::read_dir(dir.unwrap().path()).unwrap() {
            let p = entry.unwrap().path();
            if p.extension().is_some_and(|e| e == "safetensors") {
                std::fs::rename(&p, p.with_extension("hidden")).unwrap();
            }
        }
    }
    let failed = ["m0", "m1", "m2"]
        .into_iter()
        .find(
            |m| match complete(addr, None, m, PROMPT, MAX_TOKENS, false) {
                Ok(_) => false,
                Err((status, body)) => {
                    assert_eq!(status, 503, "{m}: {body}");
                    assert!(body.contains(&format!("loading {m}")), "{m}: {body}");
                    true
                }
            },
        )
        .expect("a model that must be reloaded fails");
    let failures = metric(
        &metrics(addr, None),
        "deltazip_engine_swap_load_failures_total",
    );
    assert!(failures >= 1.0);
    let t0 = std::time::Instant::now();
    let (status, body) = complete(addr, None, failed, PROMPT, MAX_TOKENS, true).unwrap_err();
    assert!(t0.elapsed() < dz_loader::engines::RELOAD_RETRY_AFTER);
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains(&format!("loading {failed} failed")) && body.contains("s ago"),
        "{body}"
    );
    assert_eq!(
        metric(
            &metrics(addr, None),
            "deltazip_engine_swap_load_failures_total"
        ),
        failures,
        "no second load"
    );
    drop(server);
}
