//! The one error type of the shared crate: what can go wrong talking to PostgreSQL or Redis.

/// A failure in a shared-layer call. Callers map it to their own responses.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("redis error: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("job queue error: {0}")]
    Queue(#[from] apalis_redis::Error),
    #[error("serialization error: {0}")]
    Json(#[from] serde_json::Error),
}

impl Error {
    /// The name of the violated constraint, when the database refused a write for one.
    pub fn constraint(&self) -> Option<&str> {
        match self {
            Error::Database(sqlx::Error::Database(db)) => db.constraint(),
            _ => None,
        }
    }

    /// True when PostgreSQL refused the statement (it answered with an error, so an
    /// autocommitted statement was rolled back), as opposed to a failure after it ran (a row
    /// that did not decode, a lost connection) where it may have committed.
    pub fn is_refused_by_database(&self) -> bool {
        matches!(self, Error::Database(sqlx::Error::Database(_)))
    }

    /// True when PostgreSQL ended the statement's session instead of answering it (`57P…`: the
    /// backend was terminated, or the server is shutting down). It answered with an error, so
    /// the statement was not committed ([`Error::is_refused_by_database`]) and can run again on
    /// another connection.
    pub fn is_session_ended(&self) -> bool {
        matches!(self, Error::Database(sqlx::Error::Database(db))
            if db.code().is_some_and(|c| c.starts_with("57P")))
    }

    /// True when a write referred to a row that is gone (`23503`): deleted by a request that
    /// ran at the same time as the one that checked it was there.
    pub fn is_reference_gone(&self) -> bool {
        matches!(self, Error::Database(sqlx::Error::Database(db)) if db.is_foreign_key_violation())
    }

    /// True when PostgreSQL aborted the statement so that another could go on, and asks for it
    /// to be run again: a deadlock (`40P01`) or a serialization failure (`40001`).
    pub fn is_conflict(&self) -> bool {
        matches!(self, Error::Database(sqlx::Error::Database(db))
            if db.code().is_some_and(|c| c == "40P01" || c == "40001"))
    }

    /// True when the backing service could not be reached, ended the session
    /// ([`Error::is_session_ended`]), or had no time or room for the query (as opposed to
    /// refusing it): the caller should answer 503 rather than 500. Time and room: a statement
    /// or lock time-out set on the server (`57014`, `55P03`), or insufficient resources (`53…`:
    /// out of disk or memory, too many connections).
    pub fn is_unavailable(&self) -> bool {
        match self {
            Error::Database(e) => {
                self.is_session_ended()
                    || matches!(
                        e,
                        sqlx::Error::PoolTimedOut
                            | sqlx::Error::PoolClosed
                            | sqlx::Error::Io(_)
                            | sqlx::Error::Tls(_)
                            | sqlx::Error::Protocol(_)
                            | sqlx::Error::WorkerCrashed
                    )
                    || matches!(e, sqlx::Error::Database(db) if db.code().is_some_and(|c| {
                        c.starts_with("08")
                            || c.starts_with("53")
                            || c == "57014"
                            || c == "55P03"
                    }))
            }
            Error::Redis(_) | Error::Queue(_) => true,
            Error::Json(_) => false,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
