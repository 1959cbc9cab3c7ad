//! Password hashing and checking (argon2, default parameters: 19 MiB and two passes each),
//! bounded. Every hash or check holds a permit of one pool shared by registration and login;
//! a request that cannot get one within the wait is turned away with 503, so a flood of
//! logins (unknown usernames included: they are checked against a dummy hash) costs at most
//! `permits` × 19 MiB and `permits` cores instead of exhausting the machine.
use std::sync::{Arc, LazyLock, Mutex, mpsc};
use std::time::Duration;

use argon2::Argon2;
use argon2::password_hash::{PasswordHasher, PasswordVerifier, phc::PasswordHash};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};

use crate::error::{ApiError, ApiResult};
use aichat_shared::lock::lock;

/// What a request turned away for want of a permit is told.
pub const BUSY: &str = "Too many sign-ins are being checked at once, please retry shortly";

/// A unit of hashing work, run on one of the hashing threads.
type Job = Box<dyn FnOnce() + Send>;

/// The permit pool and its threads; cloned into the state of every request.
///
/// Hashes run on `permits` threads of their own rather than on the runtime's blocking pool:
/// glibc gives each thread that allocates an arena of its own and keeps freed memory there, so
/// argon2's 19 MiB blocks, spread over the blocking pool's threads (up to hundreds), would each
/// stay resident in its thread's arena; on `permits` fixed threads the same blocks are reused,
/// and hashing holds about `permits` × 19 MiB however many logins come.
#[derive(Clone)]
pub struct Hashing {
    permits: Arc<Semaphore>,
    wait: Duration,
    jobs: mpsc::SyncSender<Job>,
}

impl Hashing {
    /// `permits` hashes at once (0: one per core), each waiting at most `wait` to start. The
    /// threads end when the last clone is dropped.
    pub fn new(permits: usize, wait: Duration) -> Self {
        let permits = if permits == 0 {
            std::thread::available_parallelism().map_or(2, usize::from)
        } else {
            permits
        };
        let (jobs, queue) = mpsc::sync_channel::<Job>(permits);
        let queue = Arc::new(Mutex::new(queue));
        for n in 0..permits {
            let queue = queue.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("password-hashing-{n}"))
                .spawn(move || {
                    loop {
                        // The lock is held only while waiting for the next job, not while hashing.
                        let job = lock(&queue).recv();
                        match job {
                            Ok(job) => job(),
                            Err(_) => break,
                        }
                    }
                });
            if let Err(err) = spawned {
                tracing::error!(error = %err, "could not start a password-hashing thread");
            }
        }
        Hashing {
            permits: Arc::new(Semaphore::new(permits)),
            wait,
            jobs,
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

    /// Runs `work` on a hashing thread once a permit is free (at most `wait` from now).
    async fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> ApiResult<T> {
        let permit = self.permit().await?;
        let (done, result) = oneshot::channel();
        // The job holds the permit until its work is done, also when the request that queued
        // it is gone: at most `permits` jobs are ever queued or running, and the queue holds
        // that many, so it is never full here.
        let job: Job = Box::new(move || {
            let value = work();
            drop(permit);
            let _ = done.send(value);
        });
        if self.jobs.try_send(job).is_err() {
            return Err(ApiError::Unavailable(BUSY));
        }
        result
            .await
            .map_err(|_| ApiError::Internal(anyhow::anyhow!("a password-hashing thread is gone")))
    }

    /// Django's validators on a new password for an account named `username` with `email`
    /// (`passwords::problems`), on a hashing thread: comparing a long password with the
    /// account's attributes takes up to a tenth of a second of CPU (a 4,096-byte password
    /// against a 254-character email), which would hold a request thread, and every request
    /// queued behind it, that long.
    pub async fn password_problems(
        &self,
        password: String,
        username: String,
        email: String,
    ) -> ApiResult<Vec<&'static str>> {
        self.run(move || crate::passwords::problems(&password, &username, &email))
            .await
    }

    /// Hashes a new password.
    pub async fn hash(&self, password: String) -> ApiResult<String> {
        self.run(move || hash_password(&password)).await?
    }

    /// Checks a password against a stored hash, or against a dummy one when the user is
    /// unknown, so that a wrong username takes as long as a wrong password.
    pub async fn verify(&self, password: String, stored: Option<String>) -> ApiResult<bool> {
        self.run(move || {
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
