//! The crate's error type.

/// What registering, unregistering or starting the scheduler can refuse.
///
/// A delta that fails to *load* is not an error of these calls: loads are asynchronous and their
/// failure is a state ([`crate::DeltaState::Failed`]) with the backend's message.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `register` with a name that is already registered.
    #[error("delta {name:?} is already registered")]
    AlreadyRegistered {
        /// The delta's name.
        name: String,
    },
    /// `register` with the name of a delta that was unregistered but is still used by running
    /// sequences (it is dropped once they finish; the name is free again then).
    #[error("delta {name:?} was unregistered and is still used by running sequences; register it again once they finish")]
    StillDraining {
        /// The delta's name.
        name: String,
    },
    /// `unregister` of a name that is not registered.
    #[error("no delta named {name:?} is registered")]
    UnknownDelta {
        /// The name asked for.
        name: String,
    },
    /// An empty delta name.
    #[error("a delta name must not be empty")]
    EmptyName,
    /// `load_threads = 0`: nothing would ever load.
    #[error("load_threads must be at least 1")]
    NoLoadThreads,
    /// The operating system refused a load thread.
    #[error("could not start a delta load thread: {0}")]
    Spawn(#[source] std::io::Error),
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
