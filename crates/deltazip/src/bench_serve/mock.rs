//! A mock OpenAI-compatible server for tests of the load generator (no GPU, no model): it streams
//! `min(max_tokens, MockConfig::max_tokens)` tokens with fixed delays, and can inject failures by
//! request number (HTTP 500, a stream cut mid-body, a malformed chunk, a stream ended early without
//! `[DONE]`).
//!
//! It speaks just enough HTTP/1.1 for a client like reqwest (one request per connection, answered with
//! `Connection: close`; streams in chunked encoding), written on tokio's sockets so a cut stream is a
//! real cut.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// How the mock behaves.
#[derive(Debug, Clone)]
pub struct MockConfig {
    /// The ids `GET /v1/models` lists.
    pub models: Vec<String>,
    /// The most tokens one stream carries (fewer when the request's `max_tokens` is smaller).
    pub max_tokens: usize,
    /// Before the first token.
    pub first_token_delay: Duration,
    /// Between tokens.
    pub token_delay: Duration,
    /// Every k-th request (counted from 1, in the order they reach the server) answers HTTP 500.
    pub fail_every: Option<usize>,
    /// Every k-th request (unless it fails) has its stream cut after half its tokens.
    pub break_every: Option<usize>,
    /// Every k-th request (unless it fails or breaks) sends a chunk that is not JSON after its first token.
    pub malformed_every: Option<usize>,
    /// Every k-th request (unless one of the above) ends its stream properly after half its tokens,
    /// without a final chunk or `[DONE]`.
    pub unterminated_every: Option<usize>,
}

impl Default for MockConfig {
    fn default() -> Self {
        Self {
            models: vec!["base".into()],
            max_tokens: usize::MAX,
            first_token_delay: Duration::from_millis(20),
            token_delay: Duration::from_millis(2),
            fail_every: None,
            break_every: None,
            malformed_every: None,
            unterminated_every: None,
        }
    }
}

/// What the mock did, for tests to compare with the client's report.
#[derive(Debug, Default)]
pub struct MockStats {
    /// Completion requests received.
    pub requests: AtomicUsize,
    /// Streams sent to `[DONE]`.
    pub completed: AtomicUsize,
    /// Tokens sent in those streams.
    pub completed_tokens: AtomicUsize,
    /// HTTP 500s sent.
    pub failed: AtomicUsize,
    /// Streams cut.
    pub broken: AtomicUsize,
    /// Streams with a malformed chunk.
    pub malformed: AtomicUsize,
    /// Streams ended early without `[DONE]`.
    pub unterminated: AtomicUsize,
    /// Completion requests per model name.
    pub per_model: Mutex<BTreeMap<String, usize>>,
}

/// A running mock; it stops when dropped.
pub struct MockServer {
    /// Where it listens (127.0.0.1, an ephemeral port).
    pub addr: SocketAddr,
    /// What it did so far.
    pub stats: Arc<MockStats>,
    task: tokio::task::JoinHandle<()>,
}

impl MockServer {
    /// Starts a mock on 127.0.0.1:0 (must be called inside a tokio runtime).
    pub async fn start(cfg: MockConfig) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let stats = Arc::new(MockStats::default());
        let (cfg, st) = (Arc::new(cfg), stats.clone());
        let task = tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                let (cfg, st) = (cfg.clone(), st.clone());
                tokio::spawn(async move {
                    // A test's client sees whatever went wrong; the mock just drops the connection.
                    let _ = serve(sock, &cfg, &st).await;
                });
            }
        });
        Ok(Self { addr, stats, task })
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for MockServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn read_request(sock: &mut TcpStream) -> std::io::Result<(String, String, Vec<u8>)> {
    let bad = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, m.to_string());
    let mut buf = Vec::new();
    let mut tmp = [0u8; 4096];
    let head_end = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
        if buf.len() > 64 * 1024 {
            return Err(bad("header too long"));
        }
        let n = sock.read(&mut tmp).await?;
        if n == 0 {
            return Err(bad("closed before the header ended"));
        }
        buf.extend_from_slice(&tmp[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.lines();
    let mut first = lines.next().unwrap_or_default().split(' ');
    let method = first.next().unwrap_or_default().to_string();
    let path = first.next().unwrap_or_default().to_string();
    let len = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse::<usize>().ok())
        .unwrap_or(0)
        .min(16 << 20);
    let mut body = buf[head_end..].to_vec();
    while body.len() < len {
        let n = sock.read(&mut tmp).await?;
        if n == 0 {
            return Err(bad("closed before the body ended"));
        }
        body.extend_from_slice(&tmp[..n]);
    }
    Ok((method, path, body))
}

async fn respond(sock: &mut TcpStream, status: &str, body: &str) -> std::io::Result<()> {
    let msg = format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    );
    sock.write_all(msg.as_bytes()).await?;
    sock.shutdown().await
}

async fn chunk(sock: &mut TcpStream, data: &str) -> std::io::Result<()> {
    let event = format!("data: {data}\n\n");
    sock.write_all(format!("{:x}\r\n{event}\r\n", event.len()).as_bytes())
        .await?;
    sock.flush().await
}

async fn serve(mut sock: TcpStream, cfg: &MockConfig, st: &MockStats) -> std::io::Result<()> {
    let (method, path, body) = read_request(&mut sock).await?;
    let chat = match (method.as_str(), path.as_str()) {
        ("GET", "/v1/models") => {
            let data: Vec<_> = cfg
                .models
                .iter()
                .map(|m| serde_json::json!({ "id": m, "object": "model" }))
                .collect();
            let v = serde_json::json!({ "object": "list", "data": data });
            return respond(&mut sock, "200 OK", &v.to_string()).await;
        }
        ("POST", "/v1/completions") => false,
        ("POST", "/v1/chat/completions") => true,
        _ => return respond(&mut sock, "404 Not Found", "{}").await,
    };
    let req: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    let n = st.requests.fetch_add(1, Ordering::SeqCst) + 1;
    let model = req["model"].as_str().unwrap_or_default().to_string();
    if let Ok(mut m) = st.per_model.lock() {
        *m.entry(model).or_default() += 1;
    }
    let hits = |every: Option<usize>| every.is_some_and(|k| k > 0 && n.is_multiple_of(k));
    if hits(cfg.fail_every) {
        st.failed.fetch_add(1, Ordering::SeqCst);
        let e = r#"{"error":{"message":"injected failure","type":"server_error"}}"#;
        return respond(&mut sock, "500 Internal Server Error", e).await;
    }
    let breaks = hits(cfg.break_every);
    let malformed = !breaks && hits(cfg.malformed_every);
    let unterminated = !breaks && !malformed && hits(cfg.unterminated_every);
    let tokens = req["max_tokens"]
        .as_u64()
        .map_or(16, |t| t as usize)
        .min(cfg.max_tokens);
    sock.write_all(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\
          Connection: close\r\n\r\n",
    )
    .await?;
    if chat {
        chunk(
            &mut sock,
            r#"{"choices":[{"index":0,"delta":{"role":"assistant"}}]}"#,
        )
        .await?;
    }
    tokio::time::sleep(cfg.first_token_delay).await;
    for i in 0..tokens {
        if i > 0 {
            tokio::time::sleep(cfg.token_delay).await;
        }
        if breaks && i == tokens / 2 {
            st.broken.fetch_add(1, Ordering::SeqCst);
            // Cut mid-body: no terminating chunk; dropping the socket closes it.
            return Ok(());
        }
        if unterminated && i == tokens / 2 {
            st.unterminated.fetch_add(1, Ordering::SeqCst);
            return finish(&mut sock).await;
        }
        if malformed && i == 1 {
            st.malformed.fetch_add(1, Ordering::SeqCst);
            chunk(&mut sock, "{\"choices\": [").await?;
            return finish(&mut sock).await;
        }
        let v = if chat {
            serde_json::json!({ "choices": [{ "index": 0, "delta": { "content": format!("t{i} ") } }] })
        } else {
            serde_json::json!({ "choices": [{ "index": 0, "text": format!("t{i} ") }] })
        };
        chunk(&mut sock, &v.to_string()).await?;
    }
    let last = serde_json::json!({
        "choices": [{ "index": 0, "text": "", "delta": {}, "finish_reason": "length" }],
        "usage": { "completion_tokens": tokens },
    });
    chunk(&mut sock, &last.to_string()).await?;
    // Counted before `[DONE]` leaves: the client may finish its run the moment it reads it.
    st.completed.fetch_add(1, Ordering::SeqCst);
    st.completed_tokens.fetch_add(tokens, Ordering::SeqCst);
    chunk(&mut sock, "[DONE]").await?;
    finish(&mut sock).await
}

async fn finish(sock: &mut TcpStream) -> std::io::Result<()> {
    sock.write_all(b"0\r\n\r\n").await?;
    sock.shutdown().await
}
