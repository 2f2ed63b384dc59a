//! Loopback HTTP for the server tests: one request per connection, raw HTTP/1.1 (no client library
//! between the test and the server's bytes), and the completion answers the tests compare.
#![allow(dead_code)] // each test binary uses its own part

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use dz_compress::fixtures::{self, TinyFamily, TinySpec};
use serde_json::{json, Value};

/// A seeded tiny Llama family under `root/family` with `n` fine-tunes, each compressed (8-bit RTN) to
/// `deltas/ft-<i>.dz` (`deltas` created).
pub fn family_with_deltas(root: &Path, n: usize, deltas: &Path) -> TinyFamily {
    let family = fixtures::write_family(&root.join("family"), &TinySpec::llama(), n).unwrap();
    std::fs::create_dir_all(deltas).unwrap();
    for (i, ft) in family.finetunes.iter().enumerate() {
        let out = deltas.join(format!("ft-{i}.dz"));
        fixtures::compress_rtn8(&family.base, ft, &out, &format!("ft-{i}")).expect("compress");
    }
    family
}

/// One HTTP/1.1 request (`Connection: close`); returns the status and the body (chunked transfer
/// decoded).
pub fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
    key: Option<&str>,
) -> (u16, String) {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let body = body.unwrap_or("");
    let auth = key.map_or(String::new(), |k| format!("Authorization: Bearer {k}\r\n"));
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("read response");
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a response head");
    let head = String::from_utf8_lossy(&raw[..split]).to_ascii_lowercase();
    let rest = &raw[split + 4..];
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("a status code");
    let body = if head.contains("transfer-encoding: chunked") {
        dechunk(rest)
    } else {
        rest.to_vec()
    };
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// Decodes a chunked transfer body (bytes: a chunk may end inside a UTF-8 character).
pub fn dechunk(mut s: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = s.windows(2).position(|w| w == b"\r\n") {
        let size = String::from_utf8_lossy(&s[..eol]);
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        let rest = &s[eol + 2..];
        if n == 0 {
            break;
        }
        out.extend_from_slice(&rest[..n.min(rest.len())]);
        s = rest.get(n + 2..).unwrap_or(&[]);
    }
    out
}

pub fn json_of(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

/// A completion's answer: its text, token count (plain: `usage.completion_tokens`; streamed: the
/// chunks with text) and `finish_reason` (streamed: the final chunk's, only when the stream went on
/// to `[DONE]`; `None` for a stream that just stopped).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub text: String,
    pub tokens: u64,
    pub finish: Option<String>,
}

/// A greedy completion of `prompt` by `model`: `Ok(answer)` on HTTP 200 with a well-formed answer,
/// else `Err((status, body))`.
pub fn complete(
    addr: SocketAddr,
    key: Option<&str>,
    model: &str,
    prompt: &str,
    max_tokens: usize,
    stream: bool,
) -> Result<Answer, (u16, String)> {
    let body = json!({ "model": model, "prompt": prompt, "max_tokens": max_tokens,
                       "temperature": 0.0, "top_k": 1, "stream": stream });
    let (status, text) = http(
        addr,
        "POST",
        "/v1/completions",
        Some(&body.to_string()),
        key,
    );
    if status != 200 {
        return Err((status, text));
    }
    if !stream {
        let v: Value = serde_json::from_str(&text).map_err(|_| (status, text.clone()))?;
        return match (
            v["choices"][0]["text"].as_str(),
            v["usage"]["completion_tokens"].as_u64(),
        ) {
            (Some(t), Some(n)) => Ok(Answer {
                text: t.to_string(),
                tokens: n,
                finish: v["choices"][0]["finish_reason"]
                    .as_str()
                    .map(str::to_string),
            }),
            _ => Err((status, text)),
        };
    }
    // Server-sent events: JSON chunks, then `data: [DONE]`; the host streams an error as a data
    // line that is not JSON. A stream that stops at the end-of-text token ends without a final chunk
    // and without `[DONE]` (mistral.rs 0.8.1 sends no chunk when the last token adds no text): the
    // end of the body ends it too.
    let mut answer = Answer {
        text: String::new(),
        tokens: 0,
        finish: None,
    };
    let mut finish = None;
    for line in text.lines() {
        let Some(data) = line.strip_prefix("data:").map(str::trim) else {
            continue;
        };
        if data == "[DONE]" {
            answer.finish = finish;
            return Ok(answer);
        }
        let Ok(v) = serde_json::from_str::<Value>(data) else {
            return Err((status, text.clone()));
        };
        if let Some(t) = v["choices"][0]["text"].as_str().filter(|t| !t.is_empty()) {
            answer.text.push_str(t);
            answer.tokens += 1;
        }
        if let Some(f) = v["choices"][0]["finish_reason"].as_str() {
            finish = Some(f.to_string());
        }
    }
    Ok(answer)
}

/// `GET /metrics`.
pub fn metrics(addr: SocketAddr, key: Option<&str>) -> String {
    let (status, text) = http(addr, "GET", "/metrics", None, key);
    assert_eq!(status, 200, "{text}");
    text
}

/// The value of the series `key` (name and labels, exactly as written) in a `/metrics` text, or 0.
pub fn metric(text: &str, key: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Polls `/metrics` until `done` holds for its text, or panics after `timeout` naming `what`.
pub fn wait_metrics(
    addr: SocketAddr,
    key: Option<&str>,
    what: &str,
    timeout: Duration,
    done: impl Fn(&str) -> bool,
) -> String {
    let start = Instant::now();
    loop {
        let text = metrics(addr, key);
        if done(&text) {
            return text;
        }
        assert!(
            start.elapsed() < timeout,
            "timed out waiting for {what}:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}
