//! The load generator against the in-process mock server: counts, token totals, latencies in the range
//! of the mock's delays, errors counted by kind, results files.

use std::sync::atomic::Ordering;
use std::time::Duration;

use clap::Parser;

use super::mock::{MockConfig, MockServer};
use super::*;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: BenchServeArgs,
}

fn args(url: &str, extra: &[&str]) -> BenchServeArgs {
    let mut argv = vec!["bench-serve", "--url", url, "--quiet"];
    argv.extend_from_slice(extra);
    Cli::try_parse_from(argv).expect("valid arguments").args
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime")
}

fn u(v: &serde_json::Value, k: &str) -> usize {
    v[k].as_u64()
        .unwrap_or_else(|| panic!("{k} missing in {v}")) as usize
}

fn f(v: &serde_json::Value, k: &str) -> f64 {
    v[k].as_f64()
        .unwrap_or_else(|| panic!("{k} missing in {v}"))
}

#[test]
fn counts_tokens_and_latencies_match_the_mock() {
    let rt = runtime();
    rt.block_on(async {
        let mock = MockServer::start(MockConfig {
            first_token_delay: Duration::from_millis(50),
            token_delay: Duration::from_millis(5),
            ..Default::default()
        })
        .await
        .unwrap();
        let a = args(
            &mock.url(),
            &[
                "--models",
                "m0,m1,m2",
                "--rates",
                "40,80",
                "--requests",
                "40",
                "--max-tokens",
                "8..16",
                "--prompt-words",
                "4..12",
                "--popularity",
                "zipf:1.0",
                "--seed",
                "5",
            ],
        );
        let rows = measure(&a).await.unwrap();
        assert_eq!(rows.len(), 2);
        let st = &mock.stats;
        let completed: usize = rows.iter().map(|r| u(r, "completed")).sum();
        let tokens: usize = rows.iter().map(|r| u(r, "tokens")).sum();
        assert_eq!(completed, 80);
        assert_eq!(completed, st.completed.load(Ordering::SeqCst));
        assert_eq!(tokens, st.completed_tokens.load(Ordering::SeqCst));
        let server: usize = rows.iter().map(|r| u(r, "server_tokens")).sum();
        assert_eq!(
            server, tokens,
            "usage blocks agree with the streamed chunks"
        );
        // Per model: the client's split is the mock's.
        let per_mock = st.per_model.lock().unwrap().clone();
        for (i, name) in ["m0", "m1", "m2"].iter().enumerate() {
            let sent: usize = rows.iter().map(|r| u(&r["per_model"][i], "requests")).sum();
            assert_eq!(Some(&sent), per_mock.get(*name), "{name}");
            assert_eq!(rows[0]["per_model"][i]["model"], *name);
        }
        for r in &rows {
            assert_eq!((u(r, "errors"), u(r, "requests")), (0, 40));
            // Tokens between 8 and 16 per request.
            assert!((8 * 40..=16 * 40).contains(&u(r, "tokens")), "{r}");
            // TTFT ~ 50 ms, TPOT ~ 5 ms: loose bounds (a shared CI machine).
            let ttft = f(r, "ttft_p50_s");
            assert!(
                (0.045..0.5).contains(&ttft),
                "TTFT p50 {ttft} s, mock waits 0.05 s"
            );
            assert!(f(r, "ttft_p99_s") >= ttft);
            let tpot = f(r, "tpot_p50_ms");
            assert!(
                (4.0..40.0).contains(&tpot),
                "TPOT p50 {tpot} ms, mock waits 5 ms"
            );
            assert!(f(r, "tpot_p99_ms") >= tpot);
            // E2E >= 50 ms + 7 x 5 ms.
            assert!(f(r, "e2e_p50_s") >= 0.08, "{r}");
            let window = f(r, "window_s");
            assert!((f(r, "tokens_per_s") - u(r, "tokens") as f64 / window).abs() < 1e-9);
            assert!((f(r, "requests_per_s") - 40.0 / window).abs() < 1e-9);
            for k in [
                "system",
                "n_models",
                "popularity",
                "rate",
                "tokens_per_s",
                "requests_per_s",
                "ttft_p50_s",
                "ttft_p99_s",
                "tpot_p50_ms",
                "tpot_p99_ms",
                "e2e_p50_s",
                "e2e_p99_s",
                "errors",
                "errors_by_kind",
                "requests",
                "completed",
                "per_model",
                "run",
            ] {
                assert!(!r[k].is_null(), "{k} missing");
            }
            assert_eq!(
                (r["system"].as_str(), u(r, "n_models")),
                (Some("server"), 3)
            );
            assert_eq!(r["popularity"], "zipf:1");
        }
        assert_eq!((f(&rows[0], "rate"), f(&rows[1], "rate")), (40.0, 80.0));
        // The same seed and rate give the same plan: the zipf head got the most requests.
        assert!(per_mock["m0"] > per_mock["m2"], "{per_mock:?}");
    });
}

#[test]
fn errors_are_counted_by_kind_and_never_fatal() {
    let rt = runtime();
    rt.block_on(async {
        let mock = MockServer::start(MockConfig {
            first_token_delay: Duration::from_millis(5),
            token_delay: Duration::from_millis(1),
            fail_every: Some(5),
            break_every: Some(7),
            malformed_every: Some(11),
            unterminated_every: Some(13),
            ..Default::default()
        })
        .await
        .unwrap();
        let a = args(
            &mock.url(),
            &[
                "--api",
                "chat",
                "--models",
                "a,b",
                "--rate",
                "inf",
                "--requests",
                "60",
                "--max-tokens",
                "6",
                "--max-inflight",
                "8",
                "--popularity",
                "hot:0.9",
            ],
        );
        let rows = measure(&a).await.unwrap();
        let r = &rows[0];
        let st = &mock.stats;
        let kinds = &r["errors_by_kind"];
        let n = |k: &str| kinds[k].as_u64().unwrap_or(0) as usize;
        assert_eq!(n("http_500"), st.failed.load(Ordering::SeqCst));
        assert_eq!(n("stream"), st.broken.load(Ordering::SeqCst));
        assert_eq!(n("malformed"), st.malformed.load(Ordering::SeqCst));
        assert_eq!(n("unterminated"), st.unterminated.load(Ordering::SeqCst));
        // Requests 5, 10, .. fail; 7, 14, .. (not failed) break; 11, 22, .. (neither) are malformed;
        // 13, 26, .. (none of those) end cleanly without [DONE].
        assert_eq!(
            (
                n("http_500"),
                n("stream"),
                n("malformed"),
                n("unterminated")
            ),
            (12, 7, 4, 4),
            "{kinds}"
        );
        assert_eq!(u(r, "errors"), 27);
        assert_eq!(u(r, "completed"), 33);
        assert_eq!(u(r, "completed"), st.completed.load(Ordering::SeqCst));
        assert_eq!(u(r, "tokens"), 33 * 6, "the chat role chunk is not a token");
        assert_eq!(u(r, "tokens"), st.completed_tokens.load(Ordering::SeqCst));
        assert_eq!(r["rate"], "inf");
        assert!(r["error_samples"]["http_500"]
            .as_str()
            .unwrap()
            .contains("injected failure"));
        assert!(r["error_samples"]["unterminated"]
            .as_str()
            .unwrap()
            .contains("ended without [DONE] after 3 tokens"));
        // The report lists them.
        let md = render(&rows);
        assert!(md.contains("http_500 x 12"), "{md}");
        assert!(md.contains("unterminated x 4"), "{md}");
    });
}

#[test]
fn timeouts_and_refused_connections_are_errors() {
    let rt = runtime();
    rt.block_on(async {
        let mock = MockServer::start(MockConfig {
            first_token_delay: Duration::from_secs(5),
            ..Default::default()
        })
        .await
        .unwrap();
        let a = args(
            &mock.url(),
            &[
                "--models",
                "m",
                "--rate",
                "inf",
                "--requests",
                "3",
                "--timeout",
                "0.2",
            ],
        );
        let rows = measure(&a).await.unwrap();
        assert_eq!(rows[0]["errors_by_kind"]["timeout"], 3, "{}", rows[0]);
        assert!(rows[0]["ttft_p50_s"].is_null());
        assert_eq!(f(&rows[0], "tokens_per_s"), 0.0);

        // A port nobody listens on.
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        drop(l);
        let a = args(&url, &["--models", "m", "--rate", "inf", "--requests", "2"]);
        let rows = measure(&a).await.unwrap();
        assert_eq!(rows[0]["errors_by_kind"]["connect"], 2, "{}", rows[0]);
        // Listing models from a dead server is an error of the run (nothing to measure).
        let a = args(&url, &["--models-from-server"]);
        assert!(measure(&a).await.is_err());
    });
}

#[test]
fn models_from_server_and_appended_results() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let stem = dir.path().join("sub").join("serving");
    rt.block_on(async {
        let mock = MockServer::start(MockConfig {
            models: vec!["ft-b".into(), "ft-a".into(), "ft-c".into()],
            first_token_delay: Duration::from_millis(1),
            token_delay: Duration::from_millis(1),
            ..Default::default()
        })
        .await
        .unwrap();
        for system in ["dz-4b24", "swap"] {
            let a = args(
                &mock.url(),
                &[
                    "--models-from-server",
                    "--rates",
                    "50,100",
                    "--duration",
                    "0.2",
                    "--max-tokens",
                    "3",
                    "--system",
                    system,
                ],
            );
            let rows = measure(&a).await.unwrap();
            assert_eq!(
                rows[0]["models"],
                serde_json::json!(["ft-a", "ft-b", "ft-c"])
            );
            write_results(&stem, &rows, true).unwrap();
        }
    });
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(stem.with_extension("json")).unwrap())
            .unwrap();
    let rows = json.as_array().unwrap();
    let systems: Vec<_> = rows.iter().map(|r| r["system"].as_str().unwrap()).collect();
    assert_eq!(systems, ["dz-4b24", "dz-4b24", "swap", "swap"]);
    let md = std::fs::read_to_string(stem.with_extension("md")).unwrap();
    assert!(md.contains("| dz-4b24 | 3 | uniform | 50.00 |"), "{md}");
    assert!(md.contains("| swap | 3 | uniform | 100.00 |"), "{md}");
    assert!(md.contains("commit `"), "{md}");
    // Without --append the file is replaced.
    write_results(&stem, &rows[..1], false).unwrap();
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(stem.with_extension("json")).unwrap())
            .unwrap();
    assert_eq!(json.as_array().unwrap().len(), 1);
    // A file that is not a list is refused for --append.
    std::fs::write(stem.with_extension("json"), "{}").unwrap();
    assert!(write_results(&stem, rows, true).is_err());
}

#[test]
fn bad_options_are_refused() {
    let bad = |extra: &[&str]| {
        let mut argv = vec!["bench-serve", "--url", "http://127.0.0.1:9"];
        argv.extend_from_slice(extra);
        Cli::try_parse_from(argv).is_err()
    };
    assert!(bad(&[]), "models are required");
    assert!(bad(&["--models", "a", "--models-from-server"]));
    assert!(bad(&[
        "--models",
        "a",
        "--requests",
        "3",
        "--duration",
        "1"
    ]));
    assert!(bad(&["--models", "a", "--popularity", "pareto"]));
    assert!(bad(&["--models", "a", "--max-tokens", "9..3"]));
    assert!(bad(&["--models", "a", "--append"]), "--append needs --out");
    let rt = runtime();
    for extra in [
        &["--models", "a", "--max-inflight", "0"][..],
        &["--models", "a", "--extra-body", "[1]"],
        &["--models", "a", "--rate=-1"],
        &["--models", "a", "--rate", "inf", "--duration", "1"],
    ] {
        let a = args("http://127.0.0.1:9", extra);
        assert!(rt.block_on(measure(&a)).is_err(), "{extra:?}");
    }
}

#[test]
fn warmup_sends_one_uncounted_request_per_model() {
    let rt = runtime();
    rt.block_on(async {
        let mock = MockServer::start(MockConfig::default()).await.unwrap();
        let a = args(
            &mock.url(),
            &[
                "--models",
                "m0,m1,m2,m3",
                "--rates",
                "inf",
                "--requests",
                "10",
                "--max-tokens",
                "4",
                "--warmup",
            ],
        );
        let rows = measure(&a).await.unwrap();
        let st = &mock.stats;
        // 4 warm-up requests (one per model) reached the server, the row counts only its own 10.
        assert_eq!(st.requests.load(Ordering::SeqCst), 14);
        assert_eq!(u(&rows[0], "requests"), 10);
        assert_eq!(u(&rows[0], "completed"), 10);
        let per_mock = st.per_model.lock().unwrap().clone();
        for m in ["m0", "m1", "m2", "m3"] {
            assert!(per_mock.get(m).copied().unwrap_or(0) >= 1, "{m} warmed up");
        }
        assert_eq!(rows[0]["run"]["warmup_failed"], 0);
        assert!(rows[0]["run"]["warmup_s"].as_f64().unwrap() > 0.0);
    });
}
