//! Guessing a token is slow: failed attempts are counted per client
//! address, and past a few of them that address waits, twice as long
//! after each further failure, before it may try again (a right token
//! included). Tokens are compared in constant time. Failures are logged
//! aggregated: the 1st, 2nd, 4th, 8th, … at WARN with the count so far.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Failures an address may make before it has to wait.
const FREE_FAILURES: u32 = 5;
/// The first wait; it doubles with each further failure.
const FIRST_WAIT: Duration = Duration::from_millis(500);
/// The longest wait.
const MAX_WAIT: Duration = Duration::from_secs(60);
/// An address that has not failed for this long starts afresh.
const FORGET_AFTER: Duration = Duration::from_secs(600);
/// Most addresses tracked; past it, stale ones are forgotten first and,
/// if none is stale, new addresses share one entry.
const MAX_ADDRESSES: usize = 4096;

/// True when `given` is `expected`, in time that depends on neither.
pub fn token_matches(given: &[u8], expected: &[u8]) -> bool {
    let a = Sha256::digest(given);
    let b = Sha256::digest(expected);
    a.ct_eq(&b).into()
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    failures: u32,
    last: Instant,
    blocked_until: Instant,
}

/// Failed attempts per client address, for one way in (`what` names it in
/// logs and messages: "console login", "client API token").
#[derive(Debug)]
pub struct Attempts {
    what: &'static str,
    by_addr: Mutex<HashMap<IpAddr, Entry>>,
    failures: caroni_peer::Refusals,
}

/// An address that must wait before it tries again.
#[derive(Debug, Clone, Copy)]
pub struct Wait(pub Duration);

impl Wait {
    /// The message a client gets.
    pub fn message(&self, what: &str) -> String {
        format!(
            "too many wrong tokens from this address: try the {what} again in {} s",
            self.0.as_secs().max(1)
        )
    }
}

/// Shared by all addresses once the table is full of live entries.
const OVERFLOW: IpAddr = IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED);

impl Attempts {
    /// No failures yet.
    pub fn new(what: &'static str) -> Self {
        Self {
            what,
            by_addr: Mutex::new(HashMap::new()),
            failures: caroni_peer::Refusals::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, Entry>> {
        self.by_addr
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// `Err` with the time left while `addr` must wait.
    pub fn check(&self, addr: IpAddr) -> Result<(), Wait> {
        let now = Instant::now();
        let m = self.lock();
        let e = m.get(&addr).or_else(|| m.get(&OVERFLOW));
        match e {
            Some(e) if e.blocked_until > now => Err(Wait(e.blocked_until - now)),
            _ => Ok(()),
        }
    }

    /// Counts a wrong token from `addr`.
    pub fn failed(&self, addr: IpAddr) {
        let now = Instant::now();
        let mut m = self.lock();
        if m.len() >= MAX_ADDRESSES && !m.contains_key(&addr) {
            m.retain(|_, e| now.duration_since(e.last) < FORGET_AFTER);
        }
        let key = if m.len() >= MAX_ADDRESSES && !m.contains_key(&addr) {
            OVERFLOW
        } else {
            addr
        };
        let e = m.entry(key).or_insert(Entry {
            failures: 0,
            last: now,
            blocked_until: now,
        });
        if now.duration_since(e.last) >= FORGET_AFTER {
            e.failures = 0;
        }
        e.failures += 1;
        e.last = now;
        if e.failures > FREE_FAILURES {
            let doublings = (e.failures - FREE_FAILURES - 1).min(16);
            let wait = FIRST_WAIT.saturating_mul(1 << doublings).min(MAX_WAIT);
            e.blocked_until = now + wait;
        }
        let failures = e.failures;
        drop(m);
        caroni_peer::refusal!(self.failures, what = self.what, remote = %addr, failures_from_address = failures, "refused a wrong token");
    }

    /// A right token from `addr`: its count starts afresh.
    pub fn succeeded(&self, addr: IpAddr) {
        self.lock().remove(&addr);
    }

    /// What this guards, for messages.
    pub fn what(&self) -> &'static str {
        self.what
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_match_only_when_equal() {
        assert!(token_matches(b"s3cret", b"s3cret"));
        assert!(!token_matches(b"s3cre", b"s3cret"));
        assert!(!token_matches(b"s3creT", b"s3cret"));
        assert!(!token_matches(b"", b"s3cret"));
    }

    #[test]
    fn an_address_waits_after_a_few_failures_and_longer_after_more() {
        let a = Attempts::new("test");
        let ip: IpAddr = "127.0.0.1".parse().expect("ip");
        let other: IpAddr = "127.0.0.2".parse().expect("ip");
        for _ in 0..FREE_FAILURES {
            assert!(a.check(ip).is_ok());
            a.failed(ip);
        }
        assert!(a.check(ip).is_ok());
        a.failed(ip);
        let first = a.check(ip).expect_err("waits").0;
        assert!(first <= FIRST_WAIT && first > Duration::ZERO);
        a.failed(ip);
        a.failed(ip);
        let later = a.check(ip).expect_err("waits").0;
        assert!(later > first, "{later:?} > {first:?}");
        // Another address is not affected; a success starts afresh.
        assert!(a.check(other).is_ok());
        a.succeeded(ip);
        assert!(a.check(ip).is_ok());
    }
}
