//! Password hashing and checking (argon2, default parameters: 19 MiB and two passes each),
//! bounded. Every hash or check holds a permit of one pool shared by registration and login;
//! a request that cannot get one within the wait is turned away with 503, so a flood of
//! logins (unknown usernames included: they are checked against a dummy hash) costs at most
//! `permits` × 19 MiB and `permits` cores instead of exhausting the machine.
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use argon2::Argon2;
use argon2::password_hash::{PasswordHasher, PasswordVerifier, phc::PasswordHash};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::{ApiError, ApiResult};

/// What a request turned away for want of a permit is told.
pub const BUSY: &str = "Too many sign-ins are being checked at once, please retry shortly";

/// The permit pool; cloned into the state of every request.
#[derive(Clone)]
pub struct Hashing {
    permits: Arc<Semaphore>,
    wait: Duration,
}

impl Hashing {
    /// `permits` hashes at once (0: one per core), each waiting at most `wait` to start.
    pub fn new(permits: usize, wait: Duration) -> Self {
        let permits = if permits == 0 {
            std::thread::available_parallelism().map_or(2, usize::from)
        } else {
            permits
        };
        Hashing {
            permits: Arc::new(Semaphore::new(permits)),
            wait,
        }
    }

    async fn permit(&self) -> ApiResult<OwnedSemaphorePermit> {
        match tokio::time::timeout(self.wait, self.permits.clone().acquire_owned()).await {
            Ok(Ok(permit)) => Ok(permit),
            _ => {
                metrics::counter!(BUSY_METRIC).increment(1);
                Err(ApiError::Unavailable(BUSY))
            }
        }
    }

    /// Hashes a new password off the async runtime.
    pub async fn hash(&self, password: String) -> ApiResult<String> {
        let permit = self.permit().await?;
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            hash_password(&password)
        })
        .await
        .map_err(|e| ApiError::Internal(e.into()))?
    }

    /// Checks a password against a stored hash, or against a dummy one when the user is
    /// unknown, so that a wrong username takes as long as a wrong password.
    pub async fn verify(&self, password: String, stored: Option<String>) -> ApiResult<bool> {
        let permit = self.permit().await?;
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let known = stored.is_some();
            let Some(hash) = stored.or_else(|| DUMMY_HASH.clone()) else {
                return false;
            };
            let Ok(parsed) = PasswordHash::new(&hash) else {
                return false;
            };
            let matches = Argon2::default()
                .verify_password(password.as_bytes(), &parsed)
                .is_ok();
            known && matches
        })
        .await
        .map_err(|e| ApiError::Internal(e.into()))
    }
}

/// Requests turned away because every hashing permit was taken.
pub const BUSY_METRIC: &str = "aichat_password_hashing_refused_total";

/// Hashes a password now, on the calling thread (start-up commands; requests go through
/// [`Hashing::hash`]).
pub fn hash_password(password: &str) -> ApiResult<String> {
    Argon2::default()
        .hash_password(password.as_bytes())
        .map(|hash| hash.to_string())
        .map_err(|e| ApiError::Internal(anyhow::anyhow!("hashing failed: {e}")))
}

static DUMMY_HASH: LazyLock<Option<String>> =
    LazyLock::new(|| hash_password("not a real password").ok());
