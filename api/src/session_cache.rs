//! A short-lived, bounded, per-process memo of session token hash → user (with the user's own
//! daily token budget), so most authenticated requests skip the session query.
//!
//! Only live sessions are remembered, each for at most `SESSION_CACHE_SECS` and never past the
//! session's own expiry. Logging out evicts the token here at once, and on every other API
//! instance when its revocation arrives over pub/sub (`revocation.rs`); should that message be
//! lost, an instance keeps accepting the token until its entry runs out (at most
//! `SESSION_CACHE_SECS`), the bound for anything else changed in the database (an expired or
//! deleted session, a changed `is_staff`). A daily token budget set by staff is announced the
//! same way (`Revocation::UserChanged`), so it holds from the user's next request.
use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use aichat_shared::db::sessions::LiveSession;
use aichat_shared::lock::lock;
use chrono::Utc;

/// Entries kept at most; past it the expired ones go, and if none had, all of them (a refill
/// costs one query per live token, and a full map only means many distinct tokens in a few
/// seconds).
const CAPACITY: usize = 10_000;

enum Entry {
    Live {
        session: LiveSession,
        until: Instant,
    },
    /// Logged out here: a lookup that read the session before the logout must not put it
    /// back for the rest of the TTL.
    Revoked { until: Instant },
}

impl Entry {
    fn until(&self) -> Instant {
        match self {
            Entry::Live { until, .. } | Entry::Revoked { until } => *until,
        }
    }
}

pub struct SessionCache {
    ttl: Duration,
    entries: Mutex<HashMap<Vec<u8>, Entry>>,
    /// Users whose every session was just revoked, until when: a lookup that read one of their
    /// sessions before the revocation must not put it back (their new sessions are simply not
    /// remembered for that long).
    revoked_users: Mutex<HashMap<i64, Instant>>,
}

impl SessionCache {
    /// A cache keeping entries for `ttl`; a zero `ttl` disables it.
    pub fn new(ttl: Duration) -> Self {
        SessionCache {
            ttl,
            entries: Mutex::new(HashMap::new()),
            revoked_users: Mutex::new(HashMap::new()),
        }
    }

    fn enabled(&self) -> bool {
        !self.ttl.is_zero()
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<Vec<u8>, Entry>> {
        lock(&self.entries)
    }

    /// A remembered live session, if its entry has not run out.
    pub fn get(&self, token_hash: &[u8]) -> Option<LiveSession> {
        if !self.enabled() {
            return None;
        }
        let now = Instant::now();
        let mut entries = self.lock();
        match entries.get(token_hash) {
            Some(Entry::Live { session, until }) if *until > now => Some(session.clone()),
            Some(Entry::Revoked { until }) if *until > now => None,
            Some(_) => {
                entries.remove(token_hash);
                None
            }
            None => None,
        }
    }

    /// Remembers a session just read from the database, until the TTL or its expiry, whichever
    /// comes first; a token logged out here meanwhile stays out.
    pub fn insert(&self, token_hash: &[u8], session: &LiveSession) {
        if !self.enabled() {
            return;
        }
        let user = &session.user;
        let Ok(left) = (session.expires_at - Utc::now()).to_std() else {
            return; // already expired
        };
        let now = Instant::now();
        let until = now + self.ttl.min(left);
        // The entries' lock is held across the check of the user's revocation, as `revoke_user`
        // holds it across recording one: a revocation cannot fall between the check and the
        // insert.
        let mut entries = self.lock();
        {
            let mut revoked = lock(&self.revoked_users);
            revoked.retain(|_, until| *until > now);
            if revoked.contains_key(&user.id) {
                return;
            }
        }
        if let Some(Entry::Revoked { until }) = entries.get(token_hash)
            && *until > now
        {
            return;
        }
        make_room(&mut entries, now);
        entries.insert(
            token_hash.to_vec(),
            Entry::Live {
                session: session.clone(),
                until,
            },
        );
    }

    /// Forgets a session that was just revoked, and keeps it from being remembered again by a
    /// lookup that raced with the revocation.
    pub fn revoke(&self, token_hash: &[u8]) {
        if !self.enabled() {
            return;
        }
        let now = Instant::now();
        let mut entries = self.lock();
        make_room(&mut entries, now);
        entries.insert(
            token_hash.to_vec(),
            Entry::Revoked {
                until: now + self.ttl,
            },
        );
    }
}

impl SessionCache {
    /// Forgets every remembered session of `user_id` (all of them were just revoked, or the
    /// user changed), and keeps a lookup that read one before from remembering it.
    pub fn revoke_user(&self, user_id: i64) {
        if !self.enabled() {
            return;
        }
        let until = Instant::now() + self.ttl;
        // Entries first, then the revoked users: the order `insert` takes them in.
        let mut entries = self.lock();
        lock(&self.revoked_users).insert(user_id, until);
        for entry in entries.values_mut() {
            if matches!(entry, Entry::Live { session, .. } if session.user.id == user_id) {
                *entry = Entry::Revoked { until };
            }
        }
    }
}

fn make_room(entries: &mut HashMap<Vec<u8>, Entry>, now: Instant) {
    if entries.len() < CAPACITY {
        return;
    }
    entries.retain(|_, entry| entry.until() > now);
    if entries.len() >= CAPACITY {
        entries.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aichat_shared::domain::User;
    use chrono::DateTime;

    /// A session of `user` until `expires_at`, as the database answers it.
    fn live(user: User, expires_at: DateTime<Utc>) -> LiveSession {
        LiveSession {
            user,
            expires_at,
            daily_token_budget: None,
        }
    }

    fn alice() -> User {
        User {
            id: 1,
            username: "alice".into(),
            email: String::new(),
            is_staff: false,
        }
    }

    fn in_an_hour() -> DateTime<Utc> {
        Utc::now() + chrono::Duration::hours(1)
    }

    #[test]
    fn a_remembered_session_is_returned_until_revoked() {
        let cache = SessionCache::new(Duration::from_secs(60));
        cache.insert(b"t", &live(alice(), in_an_hour()));
        assert_eq!(cache.get(b"t").map(|s| s.user.id), Some(1));
        cache.revoke(b"t");
        assert!(cache.get(b"t").is_none());
        cache.insert(b"t", &live(alice(), in_an_hour()));
        assert!(
            cache.get(b"t").is_none(),
            "a racing lookup must not bring it back"
        );
    }

    #[test]
    fn an_entry_never_outlives_its_session() {
        let cache = SessionCache::new(Duration::from_secs(60));
        cache.insert(
            b"gone",
            &live(alice(), Utc::now() - chrono::Duration::seconds(1)),
        );
        assert!(cache.get(b"gone").is_none());
        cache.insert(
            b"soon",
            &live(alice(), Utc::now() + chrono::Duration::milliseconds(30)),
        );
        let deadline = Instant::now() + Duration::from_secs(5);
        while cache.get(b"soon").is_some() {
            assert!(Instant::now() < deadline, "the entry outlived its session");
            std::thread::yield_now();
        }
    }

    #[test]
    fn revoking_a_user_forgets_every_session_of_theirs_only() {
        let cache = SessionCache::new(Duration::from_secs(60));
        let bob = User {
            id: 2,
            username: "bob".into(),
            ..alice()
        };
        cache.insert(b"a1", &live(alice(), in_an_hour()));
        cache.insert(b"a2", &live(alice(), in_an_hour()));
        cache.insert(b"b1", &live(bob, in_an_hour()));
        cache.revoke_user(1);
        assert!(cache.get(b"a1").is_none() && cache.get(b"a2").is_none());
        cache.insert(b"a1", &live(alice(), in_an_hour()));
        assert!(
            cache.get(b"a1").is_none(),
            "a racing lookup must not bring it back"
        );
        // Nor one of a session that was not remembered when the revocation came.
        cache.insert(b"a3", &live(alice(), in_an_hour()));
        assert!(cache.get(b"a3").is_none());
        assert_eq!(cache.get(b"b1").map(|s| s.user.id), Some(2));
    }

    #[test]
    fn a_zero_ttl_disables_the_cache() {
        let cache = SessionCache::new(Duration::ZERO);
        cache.insert(b"t", &live(alice(), in_an_hour()));
        assert!(cache.get(b"t").is_none());
    }

    #[test]
    fn the_cache_stays_bounded() {
        let cache = SessionCache::new(Duration::from_secs(60));
        for n in 0..(CAPACITY + 10) {
            cache.insert(&n.to_le_bytes(), &live(alice(), in_an_hour()));
        }
        assert!(cache.lock().len() <= CAPACITY);
    }
}
