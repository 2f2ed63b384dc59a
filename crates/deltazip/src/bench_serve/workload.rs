//! What to send and when: the seeded request plan of one rate (Poisson arrivals, a model drawn by
//! popularity, a prompt window of a text corpus, an output length).
//!
//! The content of request `i` (model, prompt, max tokens) depends only on the seed, never on the rate,
//! so every rate (and every system measured with the same seed) sees the same sequence of requests; only
//! the arrival times change with the rate.

use std::fmt;
use std::str::FromStr;

use anyhow::{bail, Context, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// How requests are spread over the models (model 0 first).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Popularity {
    /// Every model equally likely.
    Uniform,
    /// Zipf with exponent `s`: model `i` (from 0) has weight `1 / (i + 1)^s`, decreasing with the index.
    Zipf(f64),
    /// Model 0 gets this fraction of the requests, the others share the rest uniformly.
    Hot(f64),
}

impl FromStr for Popularity {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let (kind, arg) = match s.split_once(':') {
            Some((k, a)) => (k, Some(a)),
            None => (s, None),
        };
        let num = |default: f64| -> std::result::Result<f64, String> {
            arg.map_or(Ok(default), |a| {
                a.parse::<f64>()
                    .map_err(|_| format!("{s:?}: {a:?} is not a number"))
            })
        };
        match kind {
            "uniform" if arg.is_none() => Ok(Self::Uniform),
            "zipf" => {
                let e = num(1.0)?;
                if !(e.is_finite() && e >= 0.0) {
                    return Err(format!("{s:?}: the Zipf exponent must be >= 0"));
                }
                Ok(Self::Zipf(e))
            }
            "hot" => {
                let f = num(0.9)?;
                if !(0.0..=1.0).contains(&f) {
                    return Err(format!("{s:?}: the hot fraction must be in [0, 1]"));
                }
                Ok(Self::Hot(f))
            }
            _ => Err(format!("unknown popularity {s:?} (uniform, zipf:S, hot:F)")),
        }
    }
}

impl fmt::Display for Popularity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Uniform => write!(f, "uniform"),
            Self::Zipf(s) => write!(f, "zipf:{s}"),
            Self::Hot(x) => write!(f, "hot:{x}"),
        }
    }
}

impl Popularity {
    /// The probability of each of `n` models (sums to 1; empty for `n == 0`).
    pub fn weights(&self, n: usize) -> Vec<f64> {
        if n == 0 {
            return Vec::new();
        }
        let raw: Vec<f64> = match *self {
            Self::Uniform => vec![1.0; n],
            Self::Zipf(s) => (0..n).map(|i| ((i + 1) as f64).powf(-s)).collect(),
            Self::Hot(x) if n == 1 => vec![x.max(f64::MIN_POSITIVE)],
            Self::Hot(x) => std::iter::once(x)
                .chain(std::iter::repeat_n((1.0 - x) / (n - 1) as f64, n - 1))
                .collect(),
        };
        let total: f64 = raw.iter().sum();
        raw.into_iter().map(|w| w / total).collect()
    }
}

/// Draws model indices from a popularity (inverse CDF).
#[derive(Debug, Clone)]
pub struct ModelSampler {
    cdf: Vec<f64>,
}

impl ModelSampler {
    /// A sampler over `n >= 1` models.
    pub fn new(pop: Popularity, n: usize) -> Self {
        let mut acc = 0.0;
        let cdf = pop
            .weights(n)
            .into_iter()
            .map(|w| {
                acc += w;
                acc
            })
            .collect();
        Self { cdf }
    }

    /// One model index.
    pub fn sample(&self, rng: &mut impl Rng) -> usize {
        let u: f64 = rng.gen();
        self.cdf
            .partition_point(|&c| c <= u)
            .min(self.cdf.len().saturating_sub(1))
    }
}

/// An inclusive range of counts, written `N` or `A..B`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CountRange {
    /// Smallest value.
    pub lo: usize,
    /// Largest value (inclusive).
    pub hi: usize,
}

impl FromStr for CountRange {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let num = |t: &str| {
            t.trim()
                .parse::<usize>()
                .map_err(|_| format!("{s:?}: expected N or A..B with whole numbers"))
        };
        let (lo, hi) = match s.split_once("..") {
            Some((a, b)) => (num(a)?, num(b.trim_start_matches('='))?),
            None => {
                let n = num(s)?;
                (n, n)
            }
        };
        if lo == 0 || lo > hi {
            return Err(format!("{s:?}: need 1 <= A <= B"));
        }
        Ok(Self { lo, hi })
    }
}

impl fmt::Display for CountRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.lo == self.hi {
            write!(f, "{}", self.lo)
        } else {
            write!(f, "{}..{}", self.lo, self.hi)
        }
    }
}

impl CountRange {
    /// One value, uniform over the range.
    pub fn sample(&self, rng: &mut impl Rng) -> usize {
        rng.gen_range(self.lo..=self.hi)
    }
}

/// A text cut into words; prompts are windows of consecutive words (wrapping at the end).
#[derive(Debug, Clone)]
pub struct Corpus {
    words: Vec<String>,
}

impl Corpus {
    /// Splits `text` on whitespace; refused when it has no words.
    pub fn new(text: &str) -> Result<Self> {
        let words: Vec<String> = text.split_whitespace().map(str::to_string).collect();
        if words.is_empty() {
            bail!("the prompt corpus has no words");
        }
        Ok(Self { words })
    }

    /// Reads a corpus file.
    pub fn from_file(path: &std::path::Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the corpus {}", path.display()))?;
        Self::new(&text).with_context(|| path.display().to_string())
    }

    /// `n` consecutive words from a random position.
    pub fn window(&self, n: usize, rng: &mut impl Rng) -> String {
        let start = rng.gen_range(0..self.words.len());
        let mut out = String::new();
        for k in 0..n {
            if k > 0 {
                out.push(' ');
            }
            out.push_str(&self.words[(start + k) % self.words.len()]);
        }
        out
    }
}

/// How many requests one rate sends.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Length {
    /// Exactly this many.
    Requests(usize),
    /// Every arrival in the first this many seconds.
    Duration(f64),
}

/// One request of the plan.
#[derive(Debug, Clone)]
pub struct Planned {
    /// Position in the plan (the same request content for the same index at every rate).
    pub index: usize,
    /// Arrival time, seconds after the rate's start.
    pub at: f64,
    /// Index into the model list.
    pub model: usize,
    /// The prompt text.
    pub prompt: String,
    /// `max_tokens` of the request.
    pub max_tokens: usize,
}

/// The request mix: popularity over `n_models`, prompts, output lengths, seed.
#[derive(Debug, Clone)]
pub struct Mix<'a> {
    /// Number of models.
    pub n_models: usize,
    /// How requests spread over them.
    pub popularity: Popularity,
    /// Prompt source.
    pub corpus: &'a Corpus,
    /// Prompt length in words.
    pub prompt_words: CountRange,
    /// `max_tokens` per request.
    pub max_tokens: CountRange,
    /// The seed of everything.
    pub seed: u64,
}

/// The gap before the next arrival of a Poisson process at `rate` per second (0 for an infinite rate).
pub fn exp_gap(rate: f64, rng: &mut impl Rng) -> f64 {
    if rate.is_infinite() {
        return 0.0;
    }
    let u: f64 = rng.gen();
    -(1.0 - u).ln() / rate
}

/// The plan of one rate: arrivals of a Poisson process at `rate` requests/s (`inf`: all at once),
/// `rate_index` decorrelating the arrival streams of successive rates.
pub fn plan(mix: &Mix<'_>, rate: f64, length: Length, rate_index: usize) -> Result<Vec<Planned>> {
    if rate.is_nan() || rate <= 0.0 {
        bail!("rate {rate} must be > 0");
    }
    if mix.n_models == 0 {
        bail!("no models to send requests to");
    }
    if let Length::Duration(d) = length {
        if rate.is_infinite() {
            bail!("an infinite rate needs --requests, not --duration");
        }
        if !(d.is_finite() && d > 0.0) {
            bail!("duration {d} must be > 0");
        }
    }
    let sampler = ModelSampler::new(mix.popularity, mix.n_models);
    let mut content = StdRng::seed_from_u64(mix.seed);
    let mut arrivals = StdRng::seed_from_u64(
        mix.seed ^ 0x9E37_79B9_7F4A_7C15u64.wrapping_mul(rate_index as u64 + 1),
    );
    let mut out = Vec::new();
    let mut t = 0.0;
    loop {
        if let Length::Requests(n) = length {
            if out.len() >= n {
                break;
            }
        }
        t += exp_gap(rate, &mut arrivals);
        if let Length::Duration(d) = length {
            if t >= d {
                break;
            }
        }
        let model = sampler.sample(&mut content);
        let words = mix.prompt_words.sample(&mut content);
        let prompt = mix.corpus.window(words, &mut content);
        let max_tokens = mix.max_tokens.sample(&mut content);
        out.push(Planned {
            index: out.len(),
            at: t,
            model,
            prompt,
            max_tokens,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn freqs(pop: Popularity, n: usize, draws: usize) -> Vec<f64> {
        let s = ModelSampler::new(pop, n);
        let mut rng = StdRng::seed_from_u64(11);
        let mut c = vec![0usize; n];
        for _ in 0..draws {
            c[s.sample(&mut rng)] += 1;
        }
        c.into_iter().map(|k| k as f64 / draws as f64).collect()
    }

    #[test]
    fn popularity_frequencies_match_their_weights() {
        let n = 8;
        let draws = 200_000;
        for pop in [
            Popularity::Uniform,
            Popularity::Zipf(1.0),
            Popularity::Hot(0.9),
        ] {
            let w = pop.weights(n);
            assert!((w.iter().sum::<f64>() - 1.0).abs() < 1e-12);
            let f = freqs(pop, n, draws);
            for (i, (fi, wi)) in f.iter().zip(&w).enumerate() {
                assert!(
                    (fi - wi).abs() < 0.005,
                    "{pop}: model {i}: frequency {fi}, expected {wi}, tolerance 0.005"
                );
            }
        }
        // The shapes themselves.
        let z = Popularity::Zipf(1.0).weights(4);
        let h: f64 = 1.0 + 0.5 + 1.0 / 3.0 + 0.25;
        assert!((z[0] - 1.0 / h).abs() < 1e-12 && (z[3] - 0.25 / h).abs() < 1e-12);
        assert!(z.windows(2).all(|p| p[0] > p[1]), "zipf decreases: {z:?}");
        let hot = Popularity::Hot(0.9).weights(5);
        assert!((hot[0] - 0.9).abs() < 1e-12 && (hot[4] - 0.025).abs() < 1e-12);
        assert_eq!(Popularity::Hot(0.5).weights(1), vec![1.0]);
    }

    #[test]
    fn popularity_and_ranges_parse() {
        assert_eq!("uniform".parse(), Ok(Popularity::Uniform));
        assert_eq!("zipf".parse(), Ok(Popularity::Zipf(1.0)));
        assert_eq!("zipf:1.2".parse(), Ok(Popularity::Zipf(1.2)));
        assert_eq!("hot:0.8".parse(), Ok(Popularity::Hot(0.8)));
        for bad in ["hot:1.5", "zipf:-1", "zipf:x", "pareto", "uniform:2"] {
            assert!(bad.parse::<Popularity>().is_err(), "{bad}");
        }
        assert_eq!("64..256".parse(), Ok(CountRange { lo: 64, hi: 256 }));
        assert_eq!("128".parse(), Ok(CountRange { lo: 128, hi: 128 }));
        assert_eq!("1..=3".parse(), Ok(CountRange { lo: 1, hi: 3 }));
        for bad in ["0", "5..4", "a..b", ""] {
            assert!(bad.parse::<CountRange>().is_err(), "{bad}");
        }
        assert_eq!(CountRange { lo: 4, hi: 9 }.to_string(), "4..9");
    }

    #[test]
    fn poisson_gaps_have_the_right_mean_and_spread() {
        let mut rng = StdRng::seed_from_u64(3);
        let rate = 4.0;
        let n = 50_000;
        let gaps: Vec<f64> = (0..n).map(|_| exp_gap(rate, &mut rng)).collect();
        let mean = gaps.iter().sum::<f64>() / n as f64;
        let var = gaps.iter().map(|g| (g - mean).powi(2)).sum::<f64>() / n as f64;
        assert!(
            (mean - 0.25).abs() < 0.25 * 0.02,
            "mean gap {mean}, expected 0.25"
        );
        // Exponential: standard deviation equals the mean.
        assert!((var.sqrt() - 0.25).abs() < 0.25 * 0.05, "sd {}", var.sqrt());
        assert_eq!(exp_gap(f64::INFINITY, &mut rng), 0.0);
    }

    #[test]
    fn plans_are_seeded_and_share_content_across_rates() {
        let corpus = Corpus::new("one two three four five six seven").unwrap();
        let mix = Mix {
            n_models: 3,
            popularity: Popularity::Zipf(1.0),
            corpus: &corpus,
            prompt_words: "2..4".parse().unwrap(),
            max_tokens: "5..9".parse().unwrap(),
            seed: 42,
        };
        let a = plan(&mix, 2.0, Length::Requests(50), 0).unwrap();
        let b = plan(&mix, 2.0, Length::Requests(50), 0).unwrap();
        let c = plan(&mix, 8.0, Length::Requests(50), 1).unwrap();
        assert_eq!(a.len(), 50);
        for ((x, y), z) in a.iter().zip(&b).zip(&c) {
            assert_eq!(
                (x.at, x.model, &x.prompt, x.max_tokens),
                (y.at, y.model, &y.prompt, y.max_tokens)
            );
            assert_eq!(
                (x.model, &x.prompt, x.max_tokens),
                (z.model, &z.prompt, z.max_tokens)
            );
            let words = x.prompt.split(' ').count();
            assert!((2..=4).contains(&words) && (5..=9).contains(&x.max_tokens));
        }
        assert!(a.windows(2).all(|p| p[0].at <= p[1].at));
        assert!(
            c.last().unwrap().at < a.last().unwrap().at,
            "a higher rate arrives sooner"
        );
        // A duration: about rate x duration arrivals, all inside it.
        let d = plan(&mix, 100.0, Length::Duration(20.0), 0).unwrap();
        assert!(
            (d.len() as f64 - 2000.0).abs() < 150.0,
            "{} arrivals",
            d.len()
        );
        assert!(d.iter().all(|p| p.at < 20.0));
        // An infinite rate: everything at once.
        let inf = plan(&mix, f64::INFINITY, Length::Requests(5), 0).unwrap();
        assert!(inf.iter().all(|p| p.at == 0.0));
        assert!(plan(&mix, f64::INFINITY, Length::Duration(1.0), 0).is_err());
        assert!(plan(&mix, 0.0, Length::Requests(1), 0).is_err());
    }
}
