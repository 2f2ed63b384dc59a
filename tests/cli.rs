//! The `deltazip` binary as a user runs it: the demo, compress/inspect/merge/eval on a tiny family, and
//! one-line errors with a non-zero exit code.

use std::path::Path;
use std::process::{Command, Output};

use dz_compress::fixtures::{self, TinySpec};

fn deltazip(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_deltazip"))
        .args(args)
        .output()
        .expect("run deltazip")
}

fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "deltazip failed: {}\n{}",
        String::from_utf8_lossy(&o.stderr),
        String::from_utf8_lossy(&o.stdout)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A failure: non-zero exit, and stderr is exactly one line starting with `error:`.
fn one_line_error(o: &Output) -> String {
    assert!(!o.status.success(), "expected a failure");
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(err.starts_with("error: "), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    err
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The whole demo at a small size: compress 2 fine-tunes (3 deltas), then the serving stage with room
/// for 1 delta on the "GPU" and 2 in the CPU cache, so the workload evicts and reloads from both tiers.
#[test]
fn demo_compresses_then_serves_every_delta_like_merged() {
    let report = deltazip::demo::run_report(
        &deltazip::demo::DemoArgs {
            out: None,
            seed: 42,
            finetunes: 2,
            verbose: false,
            no_serve: false,
            requests: 16,
            clients: 4,
            max_tokens: 6,
            gpu_deltas: 1,
            cpu_deltas: 2,
        },
        true,
    )
    .unwrap();
    let rows = &report.rows;
    assert_eq!(rows.len(), 3, "ft-0 with obs and rtn, ft-1 with obs");
    let obs = rows.iter().find(|r| r.method == "obs").unwrap();
    let rtn = rows.iter().find(|r| r.method == "rtn").unwrap();
    assert!(
        obs.kept() > 0.85,
        "OBS keeps {:.3} of the fine-tune's divergence",
        obs.kept()
    );
    assert!(
        obs.kept() > rtn.kept(),
        "OBS {:.3} vs RTN {:.3}",
        obs.kept(),
        rtn.kept()
    );
    assert!(rows.iter().all(|r| r.ratio > 1.5));

    let serve = report.serve.expect("the serving stage ran");
    assert_eq!(serve.requests, 16);
    assert_eq!(serve.models, 4, "the base and 3 deltas");
    assert_eq!(
        (serve.errors, serve.mismatches),
        (0, 0),
        "{:?}",
        serve.problems
    );
    assert!(serve.check().is_ok());
    assert!(
        serve.streamed > 0 && serve.streamed < serve.requests,
        "a mix of streamed and plain requests: {}",
        serve.streamed
    );
    assert!(serve.generated_tokens > 0, "{serve:?}");
    // One delta fits on the GPU and two in the CPU cache: a workload over 3 deltas must evict from
    // both and load some delta again, from the CPU cache and from disk.
    assert!(serve.gpu.evictions > 0, "no GPU eviction: {serve:?}");
    assert!(serve.gpu.loads > 3, "no GPU reload: {serve:?}");
    assert!(
        serve.cpu.hits > 0,
        "no reload from the CPU cache: {serve:?}"
    );
    assert!(
        serve.cpu.evictions > 0 && serve.cpu.loads > 3,
        "no CPU eviction and disk reload: {serve:?}"
    );
}

/// `--no-serve` stops after the compress stage; a stage that could not start is a clear error.
#[test]
fn demo_serve_stage_options() {
    let help = ok(&deltazip(&["demo", "--help"]));
    for flag in [
        "--no-serve",
        "--requests",
        "--clients",
        "--max-tokens",
        "--gpu-deltas",
        "--cpu-deltas",
    ] {
        assert!(
            help.contains(flag),
            "{flag} missing from demo --help:\n{help}"
        );
    }
    let e = one_line_error(&deltazip(&[
        "demo",
        "--finetunes",
        "1",
        "--gpu-deltas",
        "0",
    ]));
    assert!(e.contains("--gpu-deltas"), "{e}");
}

#[test]
fn compress_inspect_merge_eval() {
    let dir = tempfile::tempdir().unwrap();
    let fam = fixtures::write_family(&dir.path().join("fam"), &TinySpec::llama(), 1).unwrap();
    let delta = dir.path().join("ft.dz");
    let report = dir.path().join("report.json");
    let out = ok(&deltazip(&[
        "compress",
        "--base",
        s(&fam.base),
        "--finetuned",
        s(&fam.finetunes[0]),
        "--out",
        s(&delta),
        "--calib",
        s(&fam.calib_text),
        "--samples",
        "8",
        "--seq-len",
        "64",
        "--group",
        "32",
        "--report",
        s(&report),
    ]));
    assert!(out.contains("smaller than the bf16 fine-tune"), "{out}");
    assert!(
        out.contains("layer   0") && out.contains("layer   1"),
        "{out}"
    );
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    assert!(json["ratio"].as_f64().unwrap() > 1.0);

    let dry = ok(&deltazip(&[
        "compress",
        "--base",
        s(&fam.base),
        "--finetuned",
        s(&fam.finetunes[0]),
        "--out",
        s(&dir.path().join("never.dz")),
        "--dry-run",
    ]));
    assert!(dry.contains("dry run, nothing written"), "{dry}");
    assert!(!dir.path().join("never.dz").exists());

    let inspect = ok(&deltazip(&["inspect", s(&delta), "--verify"]));
    for want in [
        "format     1.0",
        "sparse24 4b g32 sym",
        "checksums  OK",
        "model.layers.0.mlp.down_proj.weight",
    ] {
        assert!(inspect.contains(want), "missing {want:?} in\n{inspect}");
    }
    let j: serde_json::Value =
        serde_json::from_str(&ok(&deltazip(&["inspect", s(&delta), "--json"]))).unwrap();
    assert_eq!(j["manifest"]["name"], "ft-0");

    let merged = dir.path().join("merged");
    ok(&deltazip(&[
        "merge",
        "--base",
        s(&fam.base),
        "--delta",
        s(&delta),
        "--out",
        s(&merged),
    ]));
    let e_ft = ok(&deltazip(&[
        "eval",
        "--model",
        s(&fam.finetunes[0]),
        "--text",
        s(&fam.calib_text),
        "--seq-len",
        "64",
        "--json",
    ]));
    let e_bd = ok(&deltazip(&[
        "eval",
        "--base",
        s(&fam.base),
        "--delta",
        s(&delta),
        "--text",
        s(&fam.calib_text),
        "--seq-len",
        "64",
        "--json",
    ]));
    let e_m = ok(&deltazip(&[
        "eval",
        "--model",
        s(&merged),
        "--text",
        s(&fam.calib_text),
        "--seq-len",
        "64",
        "--json",
    ]));
    let ppl = |t: &str| {
        serde_json::from_str::<serde_json::Value>(t).unwrap()["ppl"]
            .as_f64()
            .unwrap()
    };
    // base + delta in memory and the merged directory are the same model (f32 family: bit-equal weights).
    assert!((ppl(&e_bd) - ppl(&e_m)).abs() < 1e-6 * ppl(&e_m));
    // And close to the fine-tune itself.
    assert!(
        (ppl(&e_bd) / ppl(&e_ft) - 1.0).abs() < 0.05,
        "{e_bd} vs {e_ft}"
    );

    // Refusing to merge over a non-empty directory, in one line.
    let e = one_line_error(&deltazip(&[
        "merge",
        "--base",
        s(&fam.base),
        "--delta",
        s(&delta),
        "--out",
        s(&merged),
    ]));
    assert!(e.contains("not empty"), "{e}");
}

#[test]
fn bad_files_give_one_line_errors() {
    let dir = tempfile::tempdir().unwrap();
    let e = one_line_error(&deltazip(&["inspect", s(&dir.path().join("missing.dz"))]));
    assert!(e.contains("missing.dz"), "{e}");

    let junk = dir.path().join("junk.dz");
    std::fs::write(&junk, b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":1}").unwrap();
    let e = one_line_error(&deltazip(&["inspect", s(&junk)]));
    assert!(e.contains("junk.dz"), "{e}");

    // A flipped payload byte is caught by --verify, naming the tensor.
    let fam = fixtures::write_family(&dir.path().join("fam"), &TinySpec::llama(), 1).unwrap();
    let delta = dir.path().join("d.dz");
    ok(&deltazip(&[
        "compress",
        "--method",
        "rtn",
        "--base",
        s(&fam.base),
        "--finetuned",
        s(&fam.finetunes[0]),
        "--out",
        s(&delta),
        "--zstd-level",
        "0",
    ]));
    let mut bytes = std::fs::read(&delta).unwrap();
    let n = bytes.len();
    bytes[n - 100] ^= 0x55;
    std::fs::write(&delta, &bytes).unwrap();
    ok(&deltazip(&["inspect", s(&delta)]));
    let e = one_line_error(&deltazip(&["inspect", s(&delta), "--verify"]));
    assert!(
        e.contains("checksum mismatch") || e.contains("padding"),
        "{e}"
    );

    // Bad arguments: clap's usage error, non-zero exit.
    let o = deltazip(&["compress", "--bits", "4"]);
    assert!(!o.status.success());
    let o = deltazip(&[
        "compress",
        "--base",
        "a",
        "--finetuned",
        "b",
        "--out",
        "c",
        "--sparsity",
        "1.5",
    ]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("sparsity"));
}

#[test]
fn bench_quality_rows_carry_the_report_fields() {
    let dir = tempfile::tempdir().unwrap();
    // 128 wide, so that the default group of 128 fits every tensor.
    let spec = TinySpec {
        hidden: 128,
        ffn: 256,
        ..TinySpec::llama()
    };
    let fam = fixtures::write_family(&dir.path().join("fam"), &spec, 1).unwrap();
    let stem = dir.path().join("q");
    ok(&deltazip(&[
        "bench",
        "quality",
        "--base",
        s(&fam.base),
        "--finetuned",
        &format!("ft={}", s(&fam.finetunes[0])),
        "--domain-text",
        &format!("ft={}", s(&fam.calib_text)),
        "--general-text",
        s(&fam.calib_text),
        "--calib",
        s(&fam.calib_text),
        "--recipes",
        "4b24,t2",
        "--methods",
        "obs,rtn",
        "--samples",
        "8",
        "--seq-len",
        "32",
        "--eval-windows",
        "2",
        "--eval-seq-len",
        "32",
        "--results",
        s(&stem),
    ]));
    let j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(stem.with_extension("json")).unwrap())
            .unwrap();
    let rows = j["rows"].as_array().unwrap();
    // The fine-tune itself, then 4b24 and t2, each with obs and rtn (a target ratio takes rtn too).
    let got: Vec<(String, String)> = rows
        .iter()
        .map(|r| {
            (
                r["recipe"].as_str().unwrap().to_string(),
                r["method"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let want = [
        ("finetune", "-"),
        ("4b24", "obs"),
        ("4b24", "rtn"),
        ("t2", "obs"),
        ("t2", "rtn"),
    ];
    assert_eq!(
        got,
        want.map(|(a, b)| (a.to_string(), b.to_string())).to_vec()
    );
    for r in rows {
        assert!(r.get("error").is_none(), "{r}");
        for k in [
            "finetune",
            "recipe",
            "method",
            "ratio",
            "gain_kept",
            "ppl_domain",
            "ppl_general",
            "kl",
            "seconds",
        ] {
            assert!(r.get(k).is_some_and(|v| !v.is_null()), "{k} missing in {r}");
        }
    }
    for r in &rows[3..] {
        assert!(r["ratio"].as_f64().unwrap() >= 2.0, "{r}");
    }
}

#[test]
fn run_generates_with_base_and_merged_fine_tune() {
    let dir = tempfile::tempdir().unwrap();
    let fam = fixtures::write_family(&dir.path().join("fam"), &TinySpec::llama(), 1).unwrap();
    let delta = dir.path().join("ft.dz");
    ok(&deltazip(&[
        "compress",
        "--base",
        s(&fam.base),
        "--finetuned",
        s(&fam.finetunes[0]),
        "--out",
        s(&delta),
        "--method",
        "rtn",
        "--bits",
        "8",
        "--sparsity",
        "none",
        "--group",
        "32",
    ]));
    let config = dir.path().join("serve.toml");
    std::fs::write(
        &config,
        format!(
            "[base]\npath = {:?}\nname = \"tiny\"\n[[delta]]\nname = \"tiny-ft\"\npath = {:?}\nmode = \"merge\"\n",
            s(&fam.base),
            s(&delta)
        ),
    )
    .unwrap();
    let run = |model: &str| {
        deltazip(&[
            "run",
            "--config",
            s(&config),
            "--model",
            model,
            "--prompt",
            "The quick brown fox",
            "--max-tokens",
            "8",
        ])
    };
    let ft = ok(&run("tiny-ft"));
    let base = ok(&run("tiny"));
    assert!(
        !ft.trim().is_empty() && !base.trim().is_empty(),
        "{ft:?} {base:?}"
    );
    let e = one_line_error(&run("nope"));
    assert!(
        e.contains("no model \"nope\"") && e.contains("tiny, tiny-ft"),
        "{e}"
    );
}

/// The host's per-step trace (host patch `0013-step-trace`, issue #10): with `DZ_TP_TRACE=1` every
/// scheduling step prints one `dz-tp-trace` line with every field (rank 0, no time spent syncing ranks
/// without tensor parallelism); one greedy request is a prompt step, then one decode step per further
/// token, each of one sequence. Without the variable, no line.
#[test]
fn step_trace_prints_one_line_per_step() {
    let dir = tempfile::tempdir().unwrap();
    let fam = fixtures::write_family(&dir.path().join("fam"), &TinySpec::llama(), 0).unwrap();
    let config = dir.path().join("serve.toml");
    std::fs::write(
        &config,
        format!("[base]\npath = {:?}\nname = \"tiny\"\n", s(&fam.base)),
    )
    .unwrap();
    let run = |trace: bool| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_deltazip"));
        cmd.args(["run", "--config", s(&config), "--model", "tiny"])
            .args(["--prompt", "The quick brown fox", "--max-tokens", "8"]);
        if trace {
            cmd.env("DZ_TP_TRACE", "1");
        } else {
            cmd.env_remove("DZ_TP_TRACE");
        }
        let out = cmd.output().expect("run deltazip");
        ok(&out);
        String::from_utf8_lossy(&out.stderr).into_owned()
    };

    let stderr = run(true);
    const KEYS: [&str; 11] = [
        "rank",
        "step",
        "t_ms",
        "sync_ms",
        "reqs",
        "running",
        "waiting",
        "prompt",
        "decode",
        "decode_lens",
        "step_ms",
    ];
    // The engine thread may still be printing the last step's line when the process exits (the answer
    // is out before the step ends): a line cut there (stderr ending without a newline) is left out, as
    // a last step never printed is (the counts below allow it).
    let complete = stderr.rfind('\n').map_or("", |end| &stderr[..=end]);
    let steps: Vec<Vec<(String, f64)>> = complete
        .lines()
        .filter_map(|l| l.strip_prefix("dz-tp-trace "))
        .map(|l| {
            l.split_whitespace()
                .map(|kv| {
                    let (k, v) = kv.split_once('=').expect("key=value");
                    (
                        k.to_string(),
                        v.parse().unwrap_or_else(|_| panic!("{kv} in {l}")),
                    )
                })
                .collect()
        })
        .collect();
    assert!(!steps.is_empty(), "no trace lines in:\n{stderr}");
    let field = |step: &[(String, f64)], key: &str| {
        step.iter()
            .find(|(k, _)| k == key)
            .unwrap_or_else(|| panic!("no {key} in {step:?}"))
            .1
    };
    let (mut prompts, mut decodes) = (0.0, 0.0);
    for (i, step) in steps.iter().enumerate() {
        let keys: Vec<&str> = step.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, KEYS, "{step:?}");
        assert_eq!(field(step, "rank"), 0.0, "{step:?}");
        assert_eq!(field(step, "step"), (i + 1) as f64, "{step:?}");
        assert_eq!(field(step, "sync_ms"), 0.0, "{step:?}");
        let (prompt, decode) = (field(step, "prompt"), field(step, "decode"));
        assert!(
            prompt <= 1.0 && decode <= 1.0,
            "one request at a time: {step:?}"
        );
        assert_eq!(field(step, "decode_lens"), decode, "{step:?}");
        prompts += prompt;
        decodes += decode;
    }
    // The host's own warm-up request may add a prompt step before ours.
    assert!((1.0..=2.0).contains(&prompts), "{stderr}");
    assert!((1.0..=7.0).contains(&decodes), "{stderr}");

    assert!(!run(false).contains("dz-tp-trace"));
}

#[test]
fn bench_serve_against_a_mock_server_writes_its_results() {
    use deltazip::bench_serve::mock::{MockConfig, MockServer};
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mock = rt
        .block_on(MockServer::start(MockConfig {
            models: vec!["base".into(), "ft-1".into()],
            first_token_delay: std::time::Duration::from_millis(5),
            token_delay: std::time::Duration::from_millis(1),
            ..Default::default()
        }))
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let stem = dir.path().join("serving");
    let url = mock.url();
    let out = ok(&deltazip(&[
        "bench",
        "serve",
        "--url",
        &url,
        "--models-from-server",
        "--rates",
        "20,40",
        "--requests",
        "8",
        "--max-tokens",
        "2..4",
        "--system",
        "base",
        "--out",
        s(&stem),
    ]));
    assert!(
        out.contains("| base | 2 | uniform | 20.00 | 8 | 8 | 0 |"),
        "{out}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(stem.with_extension("json")).unwrap())
            .unwrap();
    assert_eq!(json.as_array().unwrap().len(), 2);
    assert!(stem.with_extension("md").exists());

    // Every option is explained.
    let help = ok(&deltazip(&["bench", "serve", "--help"]));
    for opt in [
        "--url",
        "--api ",
        "--api-key",
        "--models ",
        "--models-from-server",
        "--rates",
        "--requests",
        "--duration",
        "--popularity",
        "--corpus",
        "--prompt-words",
        "--max-tokens",
        "--seed",
        "--max-inflight",
        "--timeout",
        "--extra-body",
        "--system",
        "--out",
        "--append",
        "--commit",
        "--quiet",
    ] {
        assert!(help.contains(opt), "{opt} not in --help");
    }
    let e = one_line_error(&deltazip(&[
        "bench",
        "serve",
        "--url",
        &url,
        "--models",
        "a",
        "--extra-body",
        "nope",
    ]));
    assert!(e.contains("--extra-body"), "{e}");
}
