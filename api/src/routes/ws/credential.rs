//! The session a socket was opened with, watched for its end: its expiry, or its revocation
//! on any instance (`revocation.rs`).
use std::time::Duration;

use tokio::sync::broadcast;
use tokio::sync::broadcast::error::RecvError;
use tokio::time::Instant;

use aichat_shared::db;

use crate::revocation::Revocation;
use crate::state::AppState;

/// The session a socket was opened with: the socket ends with it.
pub(super) struct Credential {
    pub(super) user_id: i64,
    pub(super) token_hash: Vec<u8>,
    pub(super) expires_at: chrono::DateTime<chrono::Utc>,
    /// Subscribed before the session was read, so no revocation after that read is missed.
    pub(super) revocations: broadcast::Receiver<Revocation>,
}

impl Credential {
    /// When the session expires, as a timer deadline.
    fn deadline(&self) -> Instant {
        let left = (self.expires_at - chrono::Utc::now())
            .to_std()
            .unwrap_or_default();
        // Sessions last days; a far-off expiry is as good as a year from now.
        Instant::now() + left.min(Duration::from_secs(365 * 24 * 3600))
    }

    /// Whether the session is gone from the database (logged out, revoked, deleted) though no
    /// revocation reached this socket: one published while Redis was unreachable, or while
    /// this instance's subscription was reconnecting, is lost. Read through the session cache
    /// (`auth::live_session`); a database that cannot be asked says no, so an outage closes
    /// no socket.
    pub(super) async fn gone(&self, state: &AppState) -> bool {
        matches!(
            crate::auth::live_session(state, &self.token_hash).await,
            Ok(None)
        )
    }

    /// Resolves when the session ends (its expiry, or its revocation on any instance), with
    /// the close reason. Cancel-safe: a revocation not yet received stays queued.
    pub(super) async fn ended(&mut self, state: &AppState) -> &'static str {
        let expiry = tokio::time::sleep_until(self.deadline());
        tokio::pin!(expiry);
        loop {
            tokio::select! {
                () = &mut expiry => return "session expired",
                revoked = self.revocations.recv() => match revoked {
                    Ok(revocation) if revocation.ends(self.user_id, &self.token_hash) => {
                        return "session ended";
                    }
                    Ok(_) => {}
                    // Revocations were missed: the database says whether this was one, and
                    // one that cannot be asked ends the socket (the client reconnects and is
                    // let in again only if its session is live).
                    Err(RecvError::Lagged(_)) => {
                        match db::sessions::find_live_session(&state.db, &self.token_hash).await {
                            Ok(Some(_)) => {}
                            Ok(None) | Err(_) => return "session ended",
                        }
                    }
                    // The hub outlives every socket; should it not, only the expiry is left.
                    Err(RecvError::Closed) => {
                        expiry.as_mut().await;
                        return "session expired";
                    }
                },
            }
        }
    }
}
