//! One streamed request to an OpenAI-compatible server, timed: the SSE `data:` lines of
//! `/v1/completions` or `/v1/chat/completions` with `stream: true`, up to `data: [DONE]`.
//!
//! A token is one streamed chunk that carries text (`choices[0].text`, or `choices[0].delta.content` for
//! chat); chunks without text (a chat role header, a final `finish_reason`, usage) are not tokens. Every
//! failure becomes an error kind on the [`Outcome`], never an `Err`: a benchmark counts them.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use tokio::time::Instant;

/// Which endpoint requests go to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Api {
    /// `POST /v1/completions` with a `prompt`.
    Completions,
    /// `POST /v1/chat/completions` with one user message.
    Chat,
}

/// The longest SSE line accepted (a server that never sends a newline is a malformed stream, not a
/// reason to grow a buffer without bound).
const MAX_LINE: usize = 1 << 20;

/// What happened to one request; times are seconds after the rate's start.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    /// Index into the model list.
    pub model: usize,
    /// When the plan wanted it sent.
    pub arrival_s: f64,
    /// When it was sent (later than `arrival_s` when `--max-inflight` held it back).
    pub sent_s: f64,
    /// When the first token arrived.
    pub first_token_s: Option<f64>,
    /// When the stream ended (or the request failed).
    pub end_s: f64,
    /// Tokens streamed (chunks with text).
    pub tokens: usize,
    /// `usage.completion_tokens` if the server streamed a usage block.
    pub server_tokens: Option<u64>,
    /// `None` on success, else the error kind: `http_<status>`, `timeout`, `connect`, `stream` (the
    /// connection broke mid-body), `malformed` (bad JSON or an over-long line), `unterminated` (the
    /// body ended cleanly but without `[DONE]`: the server gave up on the stream), `server_error` (an
    /// `error` object in the stream), `request` (anything else reqwest reports).
    pub error: Option<String>,
    /// A short description of the error, for the report.
    pub detail: Option<String>,
}

/// The server and how to talk to it.
#[derive(Debug, Clone)]
pub struct Target {
    client: reqwest::Client,
    /// Server root, without a trailing `/` or `/v1`.
    base: String,
    api: Api,
    api_key: Option<String>,
    extra: serde_json::Map<String, serde_json::Value>,
    timeout: Duration,
}

impl Target {
    /// A target at `url` (`http://host:port`, with or without `/v1`); `extra` is merged into every
    /// request body; `timeout` bounds each whole request.
    pub fn new(
        url: &str,
        api: Api,
        api_key: Option<String>,
        extra: serde_json::Map<String, serde_json::Value>,
        timeout: Duration,
    ) -> Result<Self> {
        let mut base = url.trim_end_matches('/').to_string();
        if let Some(b) = base.strip_suffix("/v1") {
            base = b.to_string();
        }
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            bail!("--url {url:?}: expected http://host:port or https://...");
        }
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10).min(timeout))
            .pool_idle_timeout(Duration::from_secs(30))
            .build()
            .context("building the HTTP client")?;
        Ok(Self {
            client,
            base,
            api,
            api_key,
            extra,
            timeout,
        })
    }

    /// The server root requests go to.
    pub fn base(&self) -> &str {
        &self.base
    }

    fn auth(&self, rb: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.api_key {
            Some(k) => rb.bearer_auth(k),
            None => rb,
        }
    }

    /// `GET /v1/models`: the ids the server lists, sorted (so two servers with the same models give the
    /// same model order, and the same popularity ranks).
    pub async fn list_models(&self) -> Result<Vec<String>> {
        let url = format!("{}/v1/models", self.base);
        let resp = self
            .auth(self.client.get(&url))
            .timeout(self.timeout)
            .send()
            .await
            .with_context(|| format!("GET {url}"))?;
        let status = resp.status();
        let body = resp.text().await.with_context(|| format!("GET {url}"))?;
        if !status.is_success() {
            bail!("GET {url}: HTTP {status}: {}", clip(&body));
        }
        let v: serde_json::Value =
            serde_json::from_str(&body).with_context(|| format!("GET {url}: not JSON"))?;
        let Some(data) = v.get("data").and_then(|d| d.as_array()) else {
            bail!("GET {url}: no `data` list in {}", clip(&body));
        };
        let mut ids: Vec<String> = data
            .iter()
            .filter_map(|m| m.get("id").and_then(|i| i.as_str()).map(str::to_string))
            .collect();
        ids.sort();
        ids.dedup();
        if ids.is_empty() {
            bail!("GET {url}: the server lists no models");
        }
        Ok(ids)
    }

    /// The JSON body of one request.
    pub fn body(&self, model: &str, prompt: &str, max_tokens: usize) -> serde_json::Value {
        let mut body = serde_json::json!({
            "model": model,
            "max_tokens": max_tokens,
            "stream": true,
        });
        match self.api {
            Api::Completions => body["prompt"] = prompt.into(),
            Api::Chat => {
                body["messages"] = serde_json::json!([{ "role": "user", "content": prompt }])
            }
        }
        if let Some(obj) = body.as_object_mut() {
            for (k, v) in &self.extra {
                obj.insert(k.clone(), v.clone());
            }
        }
        body
    }

    /// Sends one request and reads its stream to the end; `t0` is the rate's start.
    pub async fn send(
        &self,
        model: (usize, &str),
        prompt: &str,
        max_tokens: usize,
        arrival_s: f64,
        t0: Instant,
    ) -> Outcome {
        let mut out = Outcome {
            model: model.0,
            arrival_s,
            sent_s: t0.elapsed().as_secs_f64(),
            ..Default::default()
        };
        let body = self.body(model.1, prompt, max_tokens);
        match tokio::time::timeout(self.timeout, self.stream(body, t0, &mut out)).await {
            Ok(Ok(())) => {}
            Ok(Err((kind, detail))) => {
                out.error = Some(kind);
                out.detail = Some(detail);
            }
            Err(_) => {
                out.error = Some("timeout".into());
                out.detail = Some(format!("no end of stream after {:?}", self.timeout));
            }
        }
        out.end_s = t0.elapsed().as_secs_f64();
        out
    }

    async fn stream(
        &self,
        body: serde_json::Value,
        t0: Instant,
        out: &mut Outcome,
    ) -> std::result::Result<(), (String, String)> {
        let path = match self.api {
            Api::Completions => "/v1/completions",
            Api::Chat => "/v1/chat/completions",
        };
        let url = format!("{}{path}", self.base);
        let mut resp = self
            .auth(self.client.post(&url))
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body.to_string())
            .send()
            .await
            .map_err(|e| (kind_of(&e), format!("{e:#}")))?;
        let status = resp.status();
        if !status.is_success() {
            let text = resp.text().await.unwrap_or_default();
            return Err((
                format!("http_{}", status.as_u16()),
                format!("HTTP {status}: {}", clip(&text)),
            ));
        }
        let mut sse = SseReader::new(self.api);
        loop {
            let chunk = match resp.chunk().await {
                Ok(Some(c)) => c,
                Ok(None) => break,
                Err(e) => {
                    let kind = if e.is_timeout() { "timeout" } else { "stream" };
                    return Err((kind.into(), format!("{e:#}")));
                }
            };
            let now = t0.elapsed().as_secs_f64();
            let before = sse.tokens;
            let done = sse.feed(&chunk).map_err(|(k, d)| (k.to_string(), d))?;
            if before == 0 && sse.tokens > 0 {
                out.first_token_s = Some(now);
            }
            out.tokens = sse.tokens;
            out.server_tokens = sse.usage;
            if done {
                return Ok(());
            }
        }
        Err((
            "unterminated".into(),
            format!(
                "the stream ended without [DONE] after {} tokens",
                sse.tokens
            ),
        ))
    }
}

fn kind_of(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        "timeout"
    } else if e.is_connect() {
        "connect"
    } else if e.is_body() || e.is_decode() {
        "stream"
    } else {
        "request"
    }
    .into()
}

/// At most 200 characters of a server's text, on one line.
fn clip(s: &str) -> String {
    let one: String = s.split_whitespace().collect::<Vec<_>>().join(" ");
    match one.char_indices().nth(200) {
        Some((i, _)) => format!("{}...", &one[..i]),
        None => one,
    }
}

/// Incremental parser of an SSE body: bytes in (any split), tokens counted, `[DONE]` detected.
#[derive(Debug)]
pub struct SseReader {
    api: Api,
    buf: Vec<u8>,
    /// Chunks with text so far.
    pub tokens: usize,
    /// Their text, concatenated (the demo compares it with a reference).
    pub text: String,
    /// `usage.completion_tokens`, the last one streamed.
    pub usage: Option<u64>,
}

impl SseReader {
    /// A reader for the chunks of `api`.
    pub fn new(api: Api) -> Self {
        Self {
            api,
            buf: Vec::new(),
            tokens: 0,
            text: String::new(),
            usage: None,
        }
    }

    /// Takes more bytes; `Ok(true)` once `data: [DONE]` was read (what follows is ignored).
    pub fn feed(&mut self, bytes: &[u8]) -> std::result::Result<bool, (&'static str, String)> {
        self.buf.extend_from_slice(bytes);
        let mut start = 0;
        while let Some(nl) = self.buf[start..].iter().position(|&b| b == b'\n') {
            let line = &self.buf[start..start + nl];
            start += nl + 1;
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            let line = String::from_utf8_lossy(line).into_owned();
            if self.line(&line)? {
                self.buf.clear();
                return Ok(true);
            }
        }
        self.buf.drain(..start);
        if self.buf.len() > MAX_LINE {
            return Err((
                "malformed",
                format!("an SSE line longer than {MAX_LINE} bytes"),
            ));
        }
        Ok(false)
    }

    fn line(&mut self, line: &str) -> std::result::Result<bool, (&'static str, String)> {
        // Comments (`:`), `event:`, `id:`, `retry:` and blank separators carry no data.
        let Some(data) = line.strip_prefix("data:") else {
            return Ok(false);
        };
        let data = data.trim();
        if data == "[DONE]" {
            return Ok(true);
        }
        if data.is_empty() {
            return Ok(false);
        }
        let v: serde_json::Value = serde_json::from_str(data)
            .map_err(|e| ("malformed", format!("{e}: {}", clip(data))))?;
        if let Some(err) = v.get("error") {
            return Err(("server_error", clip(&err.to_string())));
        }
        if let Some(n) = v
            .get("usage")
            .and_then(|u| u.get("completion_tokens"))
            .and_then(|n| n.as_u64())
        {
            self.usage = Some(n);
        }
        let choice = v.get("choices").and_then(|c| c.get(0));
        let text = match self.api {
            Api::Completions => choice.and_then(|c| c.get("text")),
            Api::Chat => choice
                .and_then(|c| c.get("delta"))
                .and_then(|d| d.get("content")),
        };
        if let Some(t) = text.and_then(|t| t.as_str()).filter(|t| !t.is_empty()) {
            self.tokens += 1;
            self.text.push_str(t);
        }
        Ok(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_counts_text_chunks_across_any_split() {
        let body = "data: {\"choices\":[{\"text\":\"a\"}]}\n\n: keep-alive\n\n\
                    data: {\"choices\":[{\"text\":\"\"}]}\r\n\r\n\
                    data:{\"choices\":[{\"text\":\" b\"}]}\n\n\
                    data: {\"choices\":[{\"text\":\"\",\"finish_reason\":\"length\"}],\"usage\":{\"completion_tokens\":2}}\n\n\
                    data: [DONE]\n\ndata: garbage after done\n";
        for split in [1, 2, 3, 7, 1000] {
            let mut r = SseReader::new(Api::Completions);
            let mut done = false;
            for piece in body.as_bytes().chunks(split) {
                if r.feed(piece).unwrap() {
                    done = true;
                    break;
                }
            }
            assert!(done, "split {split}");
            assert_eq!((r.tokens, r.usage), (2, Some(2)), "split {split}");
            assert_eq!(r.text, "a b", "split {split}");
        }
    }

    #[test]
    fn sse_chat_skips_the_role_chunk_and_reports_bad_streams() {
        let mut r = SseReader::new(Api::Chat);
        let ok = "data: {\"choices\":[{\"delta\":{\"role\":\"assistant\"}}]}\n\n\
                  data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\ndata: [DONE]\n\n";
        assert!(r.feed(ok.as_bytes()).unwrap());
        assert_eq!(r.tokens, 1);

        let mut r = SseReader::new(Api::Chat);
        assert_eq!(r.feed(b"data: {oops\n").unwrap_err().0, "malformed");
        let mut r = SseReader::new(Api::Chat);
        let e = r
            .feed(b"data: {\"error\":{\"message\":\"boom\"}}\n")
            .unwrap_err();
        assert_eq!(e.0, "server_error");
        let mut r = SseReader::new(Api::Chat);
        assert_eq!(
            r.feed(&vec![b'x'; MAX_LINE + 1]).unwrap_err().0,
            "malformed"
        );
    }

    #[test]
    fn target_normalizes_the_url_and_merges_extra_fields() {
        let mut extra = serde_json::Map::new();
        extra.insert("temperature".into(), 0.into());
        let t = Target::new(
            "http://h:1/v1/",
            Api::Chat,
            None,
            extra,
            Duration::from_secs(1),
        )
        .unwrap();
        assert_eq!(t.base(), "http://h:1");
        let b = t.body("m", "p", 3);
        assert_eq!(b["messages"][0]["content"], "p");
        assert_eq!(
            (b["max_tokens"].as_u64(), b["stream"].as_bool()),
            (Some(3), Some(true))
        );
        assert_eq!(b["temperature"], 0);
        assert!(Target::new(
            "h:1",
            Api::Chat,
            None,
            Default::default(),
            Duration::from_secs(1)
        )
        .is_err());
    }
}
