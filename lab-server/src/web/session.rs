//! Dashboard sessions: a login with a bearer token makes a session whose
//! random id is the `lab_session` cookie (HttpOnly, SameSite=Strict, Secure
//! over TLS) and which holds a random CSRF token that every POST must send
//! back in the `x-csrf-token` header. The token is kept (as a [`Secret`],
//! in memory only) and authenticated again on every request, with the
//! API's authenticator: a token removed from the tokens file stops working
//! in the dashboard at the next reload, as it does for the API.
//!
//! Bounded: [`MAX_SESSIONS`] at once and [`SESSIONS_PER_PRINCIPAL`] per
//! principal (the least recently used is dropped for a new one, the
//! principal's own first, so one principal signing in over and over only
//! ends its own sessions),
//! [`SESSION_IDLE`] idle and [`SESSION_MAX_AGE`] in all, and
//! [`STREAMS_PER_SESSION`] server-sent event streams each.

use crate::types::Principal;
use lab_types::secret::Secret;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Sessions kept at once.
pub const MAX_SESSIONS: usize = 1024;
/// Sessions one principal may have at once.
pub const SESSIONS_PER_PRINCIPAL: usize = 16;
/// A session unused for this long ends.
pub const SESSION_IDLE: Duration = Duration::from_secs(8 * 3600);
/// A session ends this long after its login, used or not.
pub const SESSION_MAX_AGE: Duration = Duration::from_secs(24 * 3600);
/// Server-sent event streams (event feed, consoles) one session may have
/// open at once.
pub const STREAMS_PER_SESSION: usize = 8;
/// The session cookie's name.
pub const COOKIE: &str = "lab_session";

/// One login.
#[derive(Debug)]
pub struct Session {
    pub token: Secret,
    /// Who signed in (the token may name another principal later).
    principal: Principal,
    pub csrf: String,
    created: Instant,
    last_seen: Mutex<Instant>,
    streams: AtomicUsize,
}

/// An open server-sent event stream of a session; frees its place when
/// dropped.
#[derive(Debug)]
pub struct StreamSlot(Arc<Session>);

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.streams.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Session {
    /// A place for one more stream, if the session has one.
    pub fn stream(self: &Arc<Self>) -> Option<StreamSlot> {
        self.streams
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < STREAMS_PER_SESSION).then_some(n + 1)
            })
            .ok()
            .map(|_| StreamSlot(self.clone()))
    }
}

/// The sessions of one server.
#[derive(Debug, Default)]
pub struct Sessions {
    map: Mutex<HashMap<String, Arc<Session>>>,
}

/// 32 random bytes as hex.
fn random_hex() -> String {
    let mut b = [0u8; 32];
    getrandom::fill(&mut b).expect("the OS random source works");
    hex::encode(b)
}

impl Sessions {
    /// A new session for `token` (already authenticated as `principal`):
    /// its id.
    pub fn create(&self, token: Secret, principal: Principal) -> String {
        let id = random_hex();
        let now = Instant::now();
        let session = Arc::new(Session {
            token,
            principal,
            csrf: random_hex(),
            created: now,
            last_seen: Mutex::new(now),
            streams: AtomicUsize::new(0),
        });
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        map.retain(|_, s| s.alive(now));
        let last_seen = |s: &Arc<Session>| *s.last_seen.lock().unwrap_or_else(|p| p.into_inner());
        let own: Vec<(&String, &Arc<Session>)> = map
            .iter()
            .filter(|(_, s)| s.principal == session.principal)
            .collect();
        let evict = if own.len() >= SESSIONS_PER_PRINCIPAL {
            own.into_iter()
                .min_by_key(|(_, s)| last_seen(s))
                .map(|(k, _)| k.clone())
        } else if map.len() >= MAX_SESSIONS {
            map.iter()
                .min_by_key(|(_, s)| last_seen(s))
                .map(|(k, _)| k.clone())
        } else {
            None
        };
        if let Some(k) = evict {
            map.remove(&k);
        }
        map.insert(id.clone(), session);
        id
    }

    /// The live session with this id (its idle time restarts).
    pub fn get(&self, id: &str) -> Option<Arc<Session>> {
        let now = Instant::now();
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let s = map.get(id)?.clone();
        if !s.alive(now) {
            map.remove(id);
            return None;
        }
        *s.last_seen.lock().unwrap_or_else(|p| p.into_inner()) = now;
        Some(s)
    }

    pub fn remove(&self, id: &str) {
        self.map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
    }

    pub fn len(&self) -> usize {
        self.map.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Session {
    fn alive(&self, now: Instant) -> bool {
        let last = *self.last_seen.lock().unwrap_or_else(|p| p.into_inner());
        now.duration_since(self.created) < SESSION_MAX_AGE
            && now.duration_since(last) < SESSION_IDLE
    }

    /// Whether `sent` is this session's CSRF token (constant time).
    pub fn csrf_ok(&self, sent: &str) -> bool {
        let (a, b) = (self.csrf.as_bytes(), sent.as_bytes());
        a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(name: &str) -> Principal {
        Principal::new(name.to_owned()).unwrap()
    }

    #[test]
    fn sessions_are_capped_and_streams_limited() {
        let s = Sessions::default();
        let first = s.create(Secret::from_bytes(b"t0"), p("u0"));
        for i in 1..=MAX_SESSIONS {
            s.create(
                Secret::from_bytes(format!("t{i}").as_bytes()),
                p(&format!("u{i}")),
            );
        }
        assert_eq!(s.len(), MAX_SESSIONS);
        assert!(s.get(&first).is_none(), "the oldest made room");
        // One principal signing in again and again ends only its own.
        let mine: Vec<String> = (0..SESSIONS_PER_PRINCIPAL + 5)
            .map(|_| s.create(Secret::from_bytes(b"m"), p("u7")))
            .collect();
        assert_eq!(s.len(), MAX_SESSIONS);
        assert!(s.get(mine.last().unwrap()).is_some());
        assert!(s.get(&mine[0]).is_none());
        let id = s.create(Secret::from_bytes(b"x"), p("x"));
        let session = s.get(&id).unwrap();
        let slots: Vec<_> = (0..STREAMS_PER_SESSION)
            .map(|_| session.stream().unwrap())
            .collect();
        assert!(session.stream().is_none());
        drop(slots);
        assert!(session.stream().is_some());
        assert!(session.csrf_ok(&session.csrf.clone()));
        assert!(!session.csrf_ok("nope"));
        s.remove(&id);
        assert!(s.get(&id).is_none());
    }
}
