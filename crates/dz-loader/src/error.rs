//! The crate's error type.

use std::path::PathBuf;

/// Everything that can go wrong loading a `base+delta` config and serving it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The TOML does not parse, or does not match the schema (unknown key, wrong type, missing field).
    #[error("{}:{line}:{column}: {context}{message}", file.display())]
    Parse {
        /// The config file.
        file: PathBuf,
        /// 1-based line of the offending text (0 when the parser gave no position).
        line: usize,
        /// 1-based column.
        column: usize,
        /// The table the offending key is in (`[[delta]] #2: `), or empty.
        context: String,
        /// The parser's message (it names the key: "unknown field `nmae`, expected ...").
        message: String,
    },
    /// A config that parses but cannot be served: a missing file, a duplicate name, a delta made for
    /// another base or another architecture.
    #[error("{}: {field}: {message}", file.display())]
    Config {
        /// The config file.
        file: PathBuf,
        /// The offending field, as a path into the config (`delta[1].path`).
        field: String,
        /// What is wrong.
        message: String,
    },
    /// An I/O error on a named file.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// Reading or applying a delta failed.
    #[error(transparent)]
    Format(#[from] dz_format::Error),
    /// Reading a model or merging a delta into it failed.
    #[error(transparent)]
    Compress(#[from] dz_compress::Error),
    /// The host (mistral.rs) refused to load or run a model.
    #[error("mistral.rs: {0}")]
    Host(String),
}

/// The crate's result type.
pub type Result<T> = std::result::Result<T, Error>;
