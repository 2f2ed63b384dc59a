//! From outcomes to the numbers of a report: throughput over the measured window, latency percentiles,
//! errors by kind.
//!
//! The measured window of a rate runs from its start to the last request's end (arrivals are open-loop,
//! so an overloaded server shows as a long tail and a lower throughput, as in vLLM's
//! `benchmark_serving`). Throughput counts completed requests and their tokens only. Latencies are
//! measured from each request's *planned arrival*: time a request spent waiting for a `--max-inflight`
//! slot counts, as a user would see it.

use std::collections::BTreeMap;

use super::client::Outcome;

/// The `p`-quantile (0..=1) of `v`, linearly interpolated between closest ranks (numpy's default);
/// `None` when empty.
pub fn quantile(v: &[f64], p: f64) -> Option<f64> {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if s.is_empty() {
        return None;
    }
    s.sort_by(f64::total_cmp);
    let pos = p.clamp(0.0, 1.0) * (s.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    Some(s[lo] + (s[hi] - s[lo]) * (pos - lo as f64))
}

fn mean(v: &[f64]) -> Option<f64> {
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

/// The numbers of one group of requests (a rate, or one model at a rate).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Summary {
    /// Requests sent.
    pub requests: usize,
    /// Requests that streamed to `[DONE]`.
    pub completed: usize,
    /// Failed requests by kind.
    pub errors: BTreeMap<String, usize>,
    /// Tokens streamed by completed requests.
    pub tokens: usize,
    /// `usage.completion_tokens` summed over completed requests that reported it.
    pub server_tokens: Option<u64>,
    /// The measured window, seconds.
    pub window_s: f64,
    /// `tokens / window_s`.
    pub tokens_per_s: f64,
    /// `completed / window_s`.
    pub requests_per_s: f64,
    /// Time to first token (from the planned arrival), seconds.
    pub ttft_p50_s: Option<f64>,
    /// 99th percentile of the TTFT.
    pub ttft_p99_s: Option<f64>,
    /// Mean TTFT.
    pub ttft_mean_s: Option<f64>,
    /// Per output token after the first: `(end - first token) / (tokens - 1)`, milliseconds.
    pub tpot_p50_ms: Option<f64>,
    /// 99th percentile of the TPOT.
    pub tpot_p99_ms: Option<f64>,
    /// End-to-end latency (from the planned arrival), seconds.
    pub e2e_p50_s: Option<f64>,
    /// 99th percentile of the end-to-end latency.
    pub e2e_p99_s: Option<f64>,
    /// Requests sent more than 10 ms after their planned arrival (held back by `--max-inflight`).
    pub delayed: usize,
}

/// Summarizes `outcomes` over a window of `window_s` seconds.
pub fn summarize<'a>(outcomes: impl IntoIterator<Item = &'a Outcome>, window_s: f64) -> Summary {
    let mut s = Summary {
        window_s,
        ..Default::default()
    };
    let (mut ttft, mut tpot, mut e2e) = (Vec::new(), Vec::new(), Vec::new());
    for o in outcomes {
        s.requests += 1;
        if o.sent_s - o.arrival_s > 0.010 {
            s.delayed += 1;
        }
        if let Some(kind) = &o.error {
            *s.errors.entry(kind.clone()).or_default() += 1;
            continue;
        }
        s.completed += 1;
        s.tokens += o.tokens;
        if let Some(n) = o.server_tokens {
            *s.server_tokens.get_or_insert(0) += n;
        }
        e2e.push(o.end_s - o.arrival_s);
        if let Some(first) = o.first_token_s {
            ttft.push(first - o.arrival_s);
            if o.tokens >= 2 {
                tpot.push((o.end_s - first) / (o.tokens - 1) as f64 * 1e3);
            }
        }
    }
    if window_s > 0.0 {
        s.tokens_per_s = s.tokens as f64 / window_s;
        s.requests_per_s = s.completed as f64 / window_s;
    }
    s.ttft_p50_s = quantile(&ttft, 0.5);
    s.ttft_p99_s = quantile(&ttft, 0.99);
    s.ttft_mean_s = mean(&ttft);
    s.tpot_p50_ms = quantile(&tpot, 0.5);
    s.tpot_p99_ms = quantile(&tpot, 0.99);
    s.e2e_p50_s = quantile(&e2e, 0.5);
    s.e2e_p99_s = quantile(&e2e, 0.99);
    s
}

impl Summary {
    /// The summary's fields as JSON (latencies `null` when nothing completed).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "requests": self.requests,
            "completed": self.completed,
            "errors": self.errors.values().sum::<usize>(),
            "errors_by_kind": self.errors,
            "tokens": self.tokens,
            "server_tokens": self.server_tokens,
            "window_s": self.window_s,
            "tokens_per_s": self.tokens_per_s,
            "requests_per_s": self.requests_per_s,
            "ttft_p50_s": self.ttft_p50_s,
            "ttft_p99_s": self.ttft_p99_s,
            "ttft_mean_s": self.ttft_mean_s,
            "tpot_p50_ms": self.tpot_p50_ms,
            "tpot_p99_ms": self.tpot_p99_ms,
            "e2e_p50_s": self.e2e_p50_s,
            "e2e_p99_s": self.e2e_p99_s,
            "delayed": self.delayed,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_interpolate_like_numpy() {
        let v: Vec<f64> = (1..=5).map(f64::from).collect();
        assert_eq!(quantile(&v, 0.5), Some(3.0));
        assert_eq!(quantile(&v, 0.0), Some(1.0));
        assert_eq!(quantile(&v, 1.0), Some(5.0));
        assert!((quantile(&v, 0.99).unwrap() - 4.96).abs() < 1e-12);
        assert_eq!(quantile(&[], 0.5), None);
    }

    #[test]
    fn summary_counts_completed_requests_and_errors_apart() {
        let ok = |arr: f64, first: f64, end: f64, tokens: usize| Outcome {
            arrival_s: arr,
            sent_s: arr,
            first_token_s: Some(first),
            end_s: end,
            tokens,
            ..Default::default()
        };
        let failed = Outcome {
            arrival_s: 0.0,
            sent_s: 0.5,
            end_s: 0.6,
            tokens: 3,
            error: Some("http_500".into()),
            ..Default::default()
        };
        let o = [ok(0.0, 0.1, 1.1, 11), ok(1.0, 1.3, 2.3, 6), failed];
        let s = summarize(&o, 2.5);
        assert_eq!(
            (s.requests, s.completed, s.tokens, s.delayed),
            (3, 2, 17, 1)
        );
        assert_eq!(s.errors.get("http_500"), Some(&1));
        assert!((s.tokens_per_s - 17.0 / 2.5).abs() < 1e-12);
        assert!((s.requests_per_s - 0.8).abs() < 1e-12);
        assert!((s.ttft_p50_s.unwrap() - 0.2).abs() < 1e-12);
        // TPOT: 1.0 s / 10 tokens = 100 ms, 1.0 s / 5 = 200 ms.
        assert!((s.tpot_p50_ms.unwrap() - 150.0).abs() < 1e-9);
        assert!((s.e2e_p50_s.unwrap() - 1.2).abs() < 1e-12);
        assert_eq!(s.to_json()["errors"], 1);
    }
}
