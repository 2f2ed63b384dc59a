//! Calibration data: text tokenized with the model's own HF `tokenizer.json`, cut into fixed-length
//! windows, and the default calibration text shipped with the crate.
//!
//! DeltaZip calibrates ΔCompress on a few hundred short sequences of ordinary text (arXiv 2312.05215,
//! section 4.1; 256 windows of 2048 tokens from C4 in SparseGPT/GPTQ). The same tokenization serves the
//! perplexity evaluation ([`tokenize_file`]).
//!
//! Tokenizers run in pure Rust (the `tokenizers` crate with its fancy-regex backend; no hub access).

use std::path::Path;

use tokenizers::Tokenizer;

use crate::error::{Error, Result};

/// The default calibration text (about 220 KB): slices of the King James Bible (public domain), the Python
/// 3.11 documentation and the Python 3.11 standard library (PSF License); `data/README.md` in this crate
/// says where each slice comes from.
pub const DEFAULT_CALIB_TEXT: &str = include_str!("../data/calib-default.txt");

/// [`DEFAULT_CALIB_TEXT`].
pub fn default_calib_text() -> &'static str {
    DEFAULT_CALIB_TEXT
}

/// Loads an HF `tokenizer.json`.
pub fn load_tokenizer(tokenizer_json: &Path) -> Result<Tokenizer> {
    let bytes = std::fs::read(tokenizer_json).map_err(|source| Error::Io {
        path: tokenizer_json.to_path_buf(),
        source,
    })?;
    Tokenizer::from_bytes(&bytes).map_err(|e| {
        Error::Calibration(format!(
            "{}: not a usable tokenizer.json: {e}",
            tokenizer_json.display()
        ))
    })
}

/// Tokenizes `text` as one sequence, without special tokens (no BOS/EOS added).
pub fn tokenize(tokenizer: &Tokenizer, text: &str) -> Result<Vec<u32>> {
    // One call over the whole text: splitting it would change the tokens at the seams for tokenizers
    // that prepend a space marker to every input (SentencePiece-style `Metaspace`).
    let enc = tokenizer
        .encode(text, false)
        .map_err(|e| Error::Calibration(format!("cannot tokenize the text: {e}")))?;
    Ok(enc.get_ids().to_vec())
}

/// Reads a UTF-8 text file.
fn read_text(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::InvalidData {
            Error::Calibration(format!("{}: not UTF-8 text", path.display()))
        } else {
            Error::Io {
                path: path.to_path_buf(),
                source,
            }
        }
    })
}

/// Tokenizes a text file with a `tokenizer.json` (for perplexity evaluation): one sequence, no special
/// tokens.
pub fn tokenize_file(tokenizer_json: &Path, text: &Path) -> Result<Vec<u32>> {
    let tok = load_tokenizer(tokenizer_json)?;
    let text_s = read_text(text)?;
    tokenize(&tok, &text_s).map_err(|e| match e {
        Error::Calibration(m) => Error::Calibration(format!("{}: {m}", text.display())),
        other => other,
    })
}

/// Cuts `samples` windows of `seq_len` tokens from `tokens`: evenly spaced, non-overlapping, the first at
/// the start. When fewer than `samples` windows fit, returns as many as fit (at least one; the caller sees
/// the shorter result). Fewer than `seq_len` tokens, or `samples`/`seq_len` of zero, is
/// [`Error::Calibration`] naming the counts.
pub fn token_windows(tokens: &[u32], samples: usize, seq_len: usize) -> Result<Vec<Vec<u32>>> {
    if samples == 0 || seq_len == 0 {
        return Err(Error::Calibration(format!(
            "asked for {samples} windows of {seq_len} tokens; both must be at least 1"
        )));
    }
    let fit = tokens.len() / seq_len;
    if fit == 0 {
        return Err(Error::Calibration(format!(
            "the text has {} tokens; one window needs {seq_len}",
            tokens.len()
        )));
    }
    let used = samples.min(fit);
    // used * seq_len <= len, so stride >= seq_len (no overlap) and the last window ends within the text.
    let stride = tokens.len() / used;
    Ok((0..used)
        .filter_map(|i| {
            tokens
                .get(i * stride..i * stride + seq_len)
                .map(<[u32]>::to_vec)
        })
        .collect())
}

/// Tokenizes `text` and cuts [`token_windows`] from it (fewer than `samples` when the text is short: the
/// caller compares and says so).
pub fn token_samples(
    tokenizer: &Tokenizer,
    text: &str,
    samples: usize,
    seq_len: usize,
) -> Result<Vec<Vec<u32>>> {
    let tokens = tokenize(tokenizer, text)?;
    token_windows(&tokens, samples, seq_len)
}

/// Tokenizes the text file `text` with `tokenizer_json` and cuts `samples` windows of `seq_len` tokens
/// from it (see [`token_windows`]: evenly spaced, non-overlapping; fewer when the text is short; [`Error::Calibration`] when not even one fits).
pub fn load_token_samples(
    tokenizer_json: &Path,
    text: &Path,
    samples: usize,
    seq_len: usize,
) -> Result<Vec<Vec<u32>>> {
    let tok = load_tokenizer(tokenizer_json)?;
    let text_s = read_text(text)?;
    token_samples(&tok, &text_s, samples, seq_len).map_err(|e| match e {
        Error::Calibration(m) => Error::Calibration(format!("{}: {m}", text.display())),
        other => other,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_are_even_and_disjoint() {
        let t: Vec<u32> = (0..100).collect();
        let w = token_windows(&t, 3, 10).unwrap();
        assert_eq!(w.len(), 3);
        assert_eq!(w[0][0], 0);
        assert_eq!(w[1][0], 33);
        assert_eq!(w[2][0], 66);
        assert!(w.iter().all(|x| x.len() == 10));
        // Exactly enough for all.
        let w = token_windows(&t, 10, 10).unwrap();
        assert_eq!(w.len(), 10);
        assert_eq!(w[9], (90..100).collect::<Vec<_>>());
        // Too few: as many as fit.
        let w = token_windows(&t, 8, 30).unwrap();
        assert_eq!(w.len(), 3);
        assert!(w.windows(2).all(|p| p[0].last() < p[1].first()));
        // Not one.
        let e = token_windows(&t, 1, 101).unwrap_err();
        assert!(matches!(e, Error::Calibration(_)), "{e}");
        assert!(
            e.to_string().contains("100 tokens") && e.to_string().contains("101"),
            "{e}"
        );
        assert!(token_windows(&t, 0, 5).is_err());
        assert!(token_windows(&t, 5, 0).is_err());
    }

    #[test]
    fn default_text_is_sizeable_and_mixed() {
        let t = default_calib_text();
        assert!((150_000..=300_000).contains(&t.len()), "{}", t.len());
        assert!(t.contains("LORD"));
        assert!(t.contains("def "));
        assert!(t.contains(".. "));
    }
}
