//! Issue #7: with no deltas, the patched host gives exactly the unpatched host's outputs.
//!
//! `host/unpatched-check` is a binary built against crates.io mistralrs-core 0.8.1 as published (its own
//! workspace and Cargo.lock, no `[patch.crates-io]`) that loads a model the way `dz_loader::host` does
//! and prints greedy generations and next-token logits as f32 bit patterns. Each test here writes a
//! seeded tiny model, asks that binary, and asks our patched host through dz-loader, for the same
//! requests, and requires the same answers: every next-token logit bit for bit (one prefill after the
//! prompt and after each prefix of the greedy continuation), the same greedy tokens and text, and the
//! same top entries (token ids). Twice per model: a config with
//! only the base (no hook installed), and a config with a resident multi-tenant delta, asked for the
//! base (every layer wrapped by `DeltaHook`, the rows tagged with the base's name, which no delta has).
//!
//! The one output that differs by design is the scores (log-probabilities) of generated tokens: host
//! patch mistralrs-core/0012 makes them natural logs (the unpatched host reports base-10 logs of the
//! probabilities under these sampling settings, and log10 of the raw logits under plain greedy
//! decoding). So each side's scores are held to the log-softmax of the bit-identical logits, ours as
//! natural logs, the unpatched host's as base-10 logs, within [`DECODE_LOGPROB_ABS`].
//!
//! Why the scores get a tolerance and the logits none: the host's KV-cached decode steps on the CPU are
//! not bit-reproducible from run to run, patched or not. Measured on the unpatched binary alone, same
//! model and requests, 48 runs 12 at a time on 2 cores: 3 runs differ from the others in some
//! decode-step scores by 1 to 3 ulps (f32), with the same tokens; 12 runs one after another agreed. The
//! prefill logits agreed bit for bit in every run. So the logits are the bit-exact part of the
//! comparison (every position of the continuation, every vocabulary entry), and a decode step's scores,
//! computed from its own (KV-cached) logits, are compared with those from the prefill logits within a
//! tolerance.
//!
//! Requests go one at a time, on both sides: batched CPU decoding in the unpatched host gives every row
//! the last row's attention (fixed by host patch 0006), so a batch would differ by design.
//!
//! The test builds the binary itself, with `host/unpatched-check/build` (cargo, into this test binary's
//! own target dir: a second workspace in the same target dir, so the dependencies both share with the
//! same features are built once; cargo holds no lock on it while tests run). `.ci/run` runs it before
//! the tests, so the build shows in CI's log on its own; here it is then a no-op cargo call. Cold, it
//! compiles mistralrs-core a second time: minutes (ARCHITECTURE.md).

use crate::common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use common::{q, write_config, MAX_TOKENS};
use dz_loader::{Config, Engine};
use serde_json::{json, Value};

const PROMPTS: [&str; 3] = [
    "def main():\n    ",
    "The quick brown fox",
    "Once upon a time, ",
];

/// The target dir this test binary was built into (`<target>/debug/deps/loader-<hash>`).
fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    exe.ancestors()
        .nth(3)
        .map(Path::to_path_buf)
        .unwrap_or_else(|| panic!("{}: not under <target>/<profile>/deps", exe.display()))
}

/// `host/unpatched-check/build` into this test binary's target dir (once per test binary): the
/// executable.
fn unpatched_check() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../host/unpatched-check/build");
        let out = Command::new(&script)
            .arg(target_dir())
            .output()
            .unwrap_or_else(|e| panic!("{}: {e}", script.display()));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "{} failed:\n{stderr}",
            script.display()
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        let exe = PathBuf::from(stdout.lines().last().unwrap_or_default());
        assert!(
            exe.is_file(),
            "{}: no executable at {exe:?}\n{stderr}",
            script.display()
        );
        exe
    })
}

fn ids(prompt: &str) -> Vec<u32> {
    prompt.bytes().map(u32::from).collect()
}

/// What the unpatched host answers for `prompts` on the model at `dir` (f32, CPU).
fn unpatched(dir: &Path, max_seqs: usize) -> Value {
    let mut cmd = Command::new(unpatched_check());
    cmd.arg("--model")
        .arg(dir)
        .args(["--dtype", "f32"])
        .args(["--max-tokens", &MAX_TOKENS.to_string()])
        .args(["--max-seqs", &max_seqs.to_string()]);
    for p in PROMPTS {
        let list: Vec<String> = ids(p).iter().map(u32::to_string).collect();
        cmd.args(["--prompt", &list.join(",")]);
    }
    let out = cmd.output().expect("run dz-unpatched-check");
    assert!(
        out.status.success(),
        "dz-unpatched-check failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("dz-unpatched-check's JSON");
    v["results"].clone()
}

/// The same answers from our host, model `name` of `engine`, in the binary's JSON shape.
fn patched(engine: &Engine, name: &str) -> Value {
    let results: Vec<Value> = PROMPTS
        .iter()
        .map(|p| {
            let prompt = ids(p);
            let g = engine.generate_tokens(name, &prompt, MAX_TOKENS).unwrap();
            let tokens: Vec<Value> = g
                .tokens
                .iter()
                .map(|t| {
                    let top: Vec<Value> = t
                        .top
                        .iter()
                        .map(|&(id, s)| json!([id, s.to_bits()]))
                        .collect();
                    json!({"text": t.text, "logprob": t.logprob.to_bits(), "top": top})
                })
                .collect();
            let mut ctx = prompt.clone();
            let mut logits = Vec::new();
            for id in g.token_ids() {
                let l = engine.next_logits(name, &ctx).unwrap();
                logits.push(l.iter().map(|x| x.to_bits()).collect::<Vec<_>>());
                ctx.push(id.expect("a token id"));
            }
            json!({"prompt": prompt, "text": g.text, "tokens": tokens, "logits": logits})
        })
        .collect();
    Value::Array(results)
}

/// How far a score (log-probability) of a generated token, or of a top entry, may be from the
/// log-softmax of the prefill logits, absolute: a few ulps of the logits (module doc) move a
/// log-probability by about as much in absolute terms, and the sums over the vocabulary round.
const DECODE_LOGPROB_ABS: f32 = 1e-4;

/// The log-softmax of `logits` (f32 bit patterns) at `id`, summed as the patched host sums it.
fn log_softmax_at(logits: &[Value], id: usize) -> f32 {
    let l: Vec<f32> = logits.iter().map(|x| f32::from_bits(as_u32(x))).collect();
    let max = l.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let log_sum = max + l.iter().map(|&x| (x - max).exp()).sum::<f32>().ln();
    l[id] - log_sum
}

fn as_u32(v: &Value) -> u32 {
    v.as_u64()
        .and_then(|x| u32::try_from(x).ok())
        .expect("a u32")
}

/// `got` (patched) answers like `want` (unpatched): logits bit for bit, the same tokens, text and top
/// entries; each side's scores are its host's function of those logits (module doc). On failure, the
/// first difference, floats as numbers.
fn assert_same(what: &str, got: &Value, want: &Value) {
    let (g, w) = (got.as_array().unwrap(), want.as_array().unwrap());
    assert_eq!(g.len(), w.len(), "{what}: number of prompts");
    for (i, (g, w)) in g.iter().zip(w).enumerate() {
        assert_eq!(g["prompt"], w["prompt"], "{what}: prompt {i}");
        // Logits: bit for bit.
        let (gl, wl) = (
            g["logits"].as_array().unwrap(),
            w["logits"].as_array().unwrap(),
        );
        assert_eq!(gl.len(), wl.len(), "{what}: prompt {i}: logit positions");
        assert!(!gl.is_empty(), "{what}: prompt {i}: nothing generated");
        for (pos, (a, b)) in gl.iter().zip(wl).enumerate() {
            let (a, b) = (a.as_array().unwrap(), b.as_array().unwrap());
            assert_eq!(a.len(), b.len(), "{what}: prompt {i}: vocabulary");
            if let Some(j) = (0..a.len()).find(|&j| a[j] != b[j]) {
                panic!(
                    "{what}: prompt {i}, position {pos}: logit {j} is {} patched, {} unpatched",
                    f32::from_bits(as_u32(&a[j])),
                    f32::from_bits(as_u32(&b[j]))
                );
            }
        }
        // Tokens and text: equal.
        assert_eq!(g["text"], w["text"], "{what}: prompt {i}: text");
        let (gt, wt) = (
            g["tokens"].as_array().unwrap(),
            w["tokens"].as_array().unwrap(),
        );
        assert_eq!(gt.len(), wt.len(), "{what}: prompt {i}: generated tokens");
        for (t, (a, b)) in gt.iter().zip(wt).enumerate() {
            let at = format!("{what}: prompt {i}, token {t}");
            assert_eq!(a["text"], b["text"], "{at}: text");
            let (atop, btop) = (a["top"].as_array().unwrap(), b["top"].as_array().unwrap());
            assert_eq!(atop.len(), btop.len(), "{at}: top entries");
            for (x, y) in atop.iter().zip(btop) {
                assert_eq!(x[0], y[0], "{at}: top token ids");
            }
            // Scores: the unpatched host's base-10 logs of the same probabilities are ours over ln 10
            // (both -inf for entries the sampling settings filtered out).
            let same = |ours: &Value, theirs: &Value, what: &str| {
                let (o, t) = (f32::from_bits(as_u32(ours)), f32::from_bits(as_u32(theirs)));
                let t = t * std::f32::consts::LN_10;
                assert!(
                    o == t || (o - t).abs() <= DECODE_LOGPROB_ABS,
                    "{at}: {what} score {o} patched, {t} unpatched (times ln 10)"
                );
            };
            same(&a["logprob"], &b["logprob"], "generated token's");
            for (x, y) in atop.iter().zip(btop) {
                same(&x[1], &y[1], "top entry's");
            }
            // And the generated token's is the log-softmax of the logits it was chosen from (greedy:
            // the top entry).
            if let Some(id) = atop.first().and_then(|x| x[0].as_u64()) {
                let want = log_softmax_at(gl[t].as_array().unwrap(), id as usize);
                let ours = f32::from_bits(as_u32(&a["logprob"]));
                assert!(
                    (ours - want).abs() <= DECODE_LOGPROB_ABS,
                    "{at}: score {ours} for token {id}, log-softmax {want}"
                );
            }
        }
    }
}

fn check_family(f: &common::Fixture) {
    let base = format!(
        "[base]\npath = {}\ndtype = \"f32\"\nname = \"base\"\n",
        q(&f.family.base)
    );
    // Only the base: the host loads it without a hook.
    let (_d1, plain) = write_config(&base);
    let (config, deltas) = Config::load(&plain).unwrap();
    assert!(deltas.is_empty());
    let want = unpatched(&f.family.base, config.scheduler.max_seqs);
    let served = dz_loader::serve(&config, &deltas).unwrap();
    assert_same("base-only config", &patched(&served.engine, "base"), &want);
    drop(served);

    // A resident multi-tenant delta, not asked for: every layer wrapped, rows tagged "base".
    let text = format!(
        "{base}[[delta]]\nname = \"ft-0\"\npath = {}\nmode = \"multi-tenant\"\n",
        q(&f.deltas8[0])
    );
    let (_d2, hooked) = write_config(&text);
    let (config, deltas) = Config::load(&hooked).unwrap();
    let served = dz_loader::serve(&config, &deltas).unwrap();
    assert_eq!(served.registry.names(), ["ft-0"], "the delta is resident");
    assert_same(
        "base of a multi-tenant config",
        &patched(&served.engine, "base"),
        &want,
    );
    // Not vacuous: the fine-tune's rows do take its delta.
    let ft = patched(&served.engine, "ft-0");
    assert_ne!(
        ft[0]["logits"], want[0]["logits"],
        "the delta changes nothing: vacuous"
    );
}

#[test]
fn llama_with_no_deltas_is_the_unpatched_host() {
    check_family(common::llama());
}

#[test]
fn mistral_with_no_deltas_is_the_unpatched_host() {
    check_family(common::mistral());
}

#[test]
fn qwen2_with_no_deltas_is_the_unpatched_host() {
    check_family(common::qwen2());
}

/// The packages of a `Cargo.lock`: `(name, version) -> checksum` (`None` for path packages).
fn lock_packages(path: &Path) -> std::collections::BTreeMap<(String, String), Option<String>> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let lock: toml::Value =
        toml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    lock["package"]
        .as_array()
        .expect("[[package]]")
        .iter()
        .map(|p| {
            let field = |k: &str| p.get(k).and_then(|v| v.as_str()).map(str::to_string);
            (
                (field("name").unwrap(), field("version").unwrap()),
                field("checksum"),
            )
        })
        .collect()
}

/// The unpatched check builds the same versions as the workspace (its lock is the workspace's, pruned),
/// and the host crates it builds are the releases host/setup patches (host/crates.sha256).
#[test]
fn the_unpatched_check_locks_the_workspaces_versions() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let ours = lock_packages(&root.join("Cargo.lock"));
    let check = lock_packages(&root.join("host/unpatched-check/Cargo.lock"));
    let sums = std::fs::read_to_string(root.join("host/crates.sha256")).unwrap();
    let mut hosts = 0;
    for ((name, version), checksum) in &check {
        if name == "dz-unpatched-check" {
            continue;
        }
        let key = (name.clone(), version.clone());
        assert!(
            ours.contains_key(&key),
            "host/unpatched-check/Cargo.lock has {name} {version}, the workspace's does not: \
             copy the workspace's Cargo.lock there and let cargo prune it"
        );
        if name == "mistralrs-core" || name == "mistralrs-quant" {
            let sum = checksum.as_deref().expect("a registry checksum");
            assert!(
                sums.lines()
                    .any(|l| l.starts_with(sum) && l.ends_with(&format!("{name}-{version}.crate"))),
                "{name} {version}: checksum {sum} is not in host/crates.sha256"
            );
            hosts += 1;
        } else {
            assert_eq!(&ours[&key], checksum, "{name} {version}: another checksum");
        }
    }
    assert_eq!(
        hosts, 2,
        "the unpatched check does not build both host crates"
    );
}
