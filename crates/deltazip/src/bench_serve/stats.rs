//! From outcomes to the numbers of a report: throughput over the measured window, latency percentiles,
//! errors by kind.
//!
//! The measured window of a rate runs from its start to the last request's end (arrivals are open-loop,
//! so an overloaded server shows as a long tail and a lower throughput, as in vLLM's
//! `benchmark_serving`). Throughput counts completed requests and their tokens only. Beside it,
//! `mid_tokens_per_s` is the throughput between the 10th and the 90th percentile of the completion
//! times, each request's tokens taken as streamed evenly from its first token to its end: an overloaded
//! run's ramp-up and its drain (the last requests running in ever smaller batches) left out, so that it
//! measures the server at load and depends less on which requests happen to finish last. Latencies are
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
    /// Tokens a second between the 10th and the 90th percentile of the completion times ([`mid_rate`]);
    /// `None` below [`MID_MIN_COMPLETED`] completed requests or for an empty window.
    pub mid_tokens_per_s: Option<f64>,
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

/// Completed requests below which [`Summary::mid_tokens_per_s`] is not given.
pub const MID_MIN_COMPLETED: usize = 10;

/// Tokens a second streamed between the 10th and the 90th percentile of the completed requests' end
/// times, each request's `tokens` spread evenly over `first token .. end` (all at its end when that span
/// is empty). `spans` are `(first token, end, tokens)`; `None` below [`MID_MIN_COMPLETED`] of them or when
/// the window is empty.
pub fn mid_rate(spans: &[(f64, f64, usize)]) -> Option<f64> {
    if spans.len() < MID_MIN_COMPLETED {
        return None;
    }
    let ends: Vec<f64> = spans.iter().map(|s| s.1).collect();
    let (lo, hi) = (quantile(&ends, 0.1)?, quantile(&ends, 0.9)?);
    if hi <= lo {
        return None;
    }
    let tokens: f64 = spans
        .iter()
        .map(|&(first, end, n)| {
            if end <= first {
                return if (lo..=hi).contains(&end) {
                    n as f64
                } else {
                    0.0
                };
            }
            let overlap = (end.min(hi) - first.max(lo)).max(0.0);
            n as f64 * overlap / (end - first)
        })
        .sum();
    Some(tokens / (hi - lo))
}

/// Summarizes `outcomes` over a window of `window_s` seconds.
pub fn summarize<'a>(outcomes: impl IntoIterator<Item = &'a Outcome>, window_s: f64) -> Summary {
    let mut s = Summary {
        window_s,
        ..Default::default()
    };
    let (mut ttft, mut tpot, mut e2e) = (Vec::new(), Vec::new(), Vec::new());
    let mut spans = Vec::new();
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
            spans.push((first, o.end_s, o.tokens));
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
    s.mid_tokens_per_s = mid_rate(&spans);
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
            "mid_tokens_per_s": self.mid_tokens_per_s,
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
        // Two completed requests: too few for the mid-window rate.
        assert_eq!(s.mid_tokens_per_s, None);
    }

    #[test]
    fn the_mid_window_rate_leaves_out_the_ramp_and_the_drain() {
        // 20 requests streaming 10 tokens a second each, ending at 1, 2, .. 20 s: every one started 1 s
        // before its end. The 10th and 90th percentile ends are 2.9 and 18.1 s; inside them, one request
        // streams at any moment (10 tokens/s), whatever the ends outside do.
        let spans: Vec<(f64, f64, usize)> =
            (1..=20).map(|e| (e as f64 - 1.0, e as f64, 10)).collect();
        let r = mid_rate(&spans).unwrap();
        assert!((r - 10.0).abs() < 1e-9, "{r}");
        // A slow drain (the last request streaming its 10 tokens over 100 s) moves the whole-window rate,
        // not this one.
        let mut drained = spans.clone();
        drained[19] = (19.0, 119.0, 10);
        let r2 = mid_rate(&drained).unwrap();
        assert!((r2 - 10.0).abs() < 0.5, "{r2}");
        // Tokens of a request with no streaming span count at its end; too few requests give None.
        assert_eq!(mid_rate(&spans[..9]), None);
        let burst: Vec<(f64, f64, usize)> = (1..=10).map(|e| (e as f64, e as f64, 4)).collect();
        // Ends 1..10: the window is 1.9 .. 9.1 s and holds the ends 2..9, 8 x 4 tokens.
        let r3 = mid_rate(&burst).unwrap();
        assert!((r3 - 32.0 / 7.2).abs() < 1e-9, "{r3}");
    }
}
