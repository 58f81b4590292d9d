//! Abuse resistance on the external side, per source address: a request rate with temporary
//! bans for sources that keep exceeding it, and caps on concurrent connections per source and
//! in total. Pure state fed the time; the shell asks before accepting and before handling.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use rampart_rate_limit::{RateLimit, SourceRateLimiter};

/// Bans held at once at most; when full, the oldest-expiring are forgotten first.
const MAX_BANS: usize = 100_000;

#[derive(Clone, Debug, PartialEq)]
pub struct GuardSettings {
    pub requests: RateLimit,
    /// Requests over the rate before the source is banned.
    pub ban_after: u32,
    pub ban_for: Duration,
    pub connections_per_source: usize,
    pub connections_total: usize,
}

impl Default for GuardSettings {
    fn default() -> Self {
        GuardSettings {
            requests: RateLimit {
                per_second: 50.0,
                burst: 200.0,
            },
            ban_after: 100,
            ban_for: Duration::from_secs(60),
            connections_per_source: 50,
            connections_total: 10_000,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    Banned,
    SourceConnectionCap,
    ConnectionCap,
}

impl Refusal {
    pub fn counter(self) -> &'static str {
        match self {
            Refusal::Banned => "connection_from_banned_source",
            Refusal::SourceConnectionCap => "connection_source_cap",
            Refusal::ConnectionCap => "connection_total_cap",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    /// Over the rate: drop the message (counted), keep the connection.
    Throttled,
    /// Banned (now or before): close the connection.
    Banned,
}

pub struct SourceGuard {
    settings: GuardSettings,
    limiter: SourceRateLimiter,
    over_rate: HashMap<IpAddr, u32>,
    bans: HashMap<IpAddr, Instant>,
    connections: HashMap<IpAddr, usize>,
    total: usize,
}

impl SourceGuard {
    pub fn new(settings: GuardSettings) -> SourceGuard {
        SourceGuard {
            limiter: SourceRateLimiter::new(settings.requests),
            settings,
            over_rate: HashMap::new(),
            bans: HashMap::new(),
            connections: HashMap::new(),
            total: 0,
        }
    }

    pub fn is_banned(&mut self, source: IpAddr, now: Instant) -> bool {
        match self.bans.get(&source) {
            Some(until) if *until > now => true,
            Some(_) => {
                self.bans.remove(&source);
                false
            }
            None => false,
        }
    }

    /// A new connection from `source`; on `Ok` the caller must call [`Self::closed`] later.
    pub fn open(&mut self, source: IpAddr, now: Instant) -> Result<(), Refusal> {
        if self.is_banned(source, now) {
            return Err(Refusal::Banned);
        }
        if self.total >= self.settings.connections_total {
            return Err(Refusal::ConnectionCap);
        }
        let count = self.connections.entry(source).or_default();
        if *count >= self.settings.connections_per_source {
            return Err(Refusal::SourceConnectionCap);
        }
        *count += 1;
        self.total += 1;
        Ok(())
    }

    pub fn closed(&mut self, source: IpAddr) {
        if let Some(count) = self.connections.get_mut(&source) {
            *count -= 1;
            self.total -= 1;
            if *count == 0 {
                self.connections.remove(&source);
            }
        }
    }

    /// One message from `source`.
    pub fn message(&mut self, source: IpAddr, now: Instant) -> Verdict {
        if self.is_banned(source, now) {
            return Verdict::Banned;
        }
        if self.limiter.allow(source, now) {
            return Verdict::Pass;
        }
        let over = self.over_rate.entry(source).or_default();
        *over += 1;
        if *over < self.settings.ban_after {
            return Verdict::Throttled;
        }
        self.over_rate.remove(&source);
        if self.bans.len() >= MAX_BANS {
            self.bans.retain(|_, until| *until > now);
        }
        if self.bans.len() < MAX_BANS {
            self.bans.insert(source, now + self.settings.ban_for);
        }
        Verdict::Banned
    }

    /// Forget expired bans, refilled buckets and over-rate tallies of sources now within it.
    pub fn sweep(&mut self, now: Instant) {
        self.bans.retain(|_, until| *until > now);
        self.limiter.sweep(now);
        self.over_rate.clear();
    }

    pub fn connections(&self) -> usize {
        self.total
    }

    pub fn bans(&self) -> usize {
        self.bans.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard() -> SourceGuard {
        SourceGuard::new(GuardSettings {
            requests: RateLimit {
                per_second: 10.0,
                burst: 10.0,
            },
            ban_after: 5,
            ban_for: Duration::from_secs(30),
            connections_per_source: 2,
            connections_total: 3,
        })
    }

    #[test]
    fn a_flooding_source_is_throttled_then_banned_others_are_not() {
        let (mut guard, t0) = (guard(), Instant::now());
        let (flooder, other): (IpAddr, IpAddr) =
            ("192.0.2.1".parse().unwrap(), "192.0.2.2".parse().unwrap());
        let verdicts: Vec<Verdict> = (0..20).map(|_| guard.message(flooder, t0)).collect();
        assert_eq!(verdicts.iter().filter(|v| **v == Verdict::Pass).count(), 10);
        assert_eq!(verdicts[14], Verdict::Banned);
        assert_eq!(guard.message(other, t0), Verdict::Pass);
        assert_eq!(guard.open(flooder, t0), Err(Refusal::Banned));
        let later = t0 + Duration::from_secs(31);
        assert_eq!(guard.message(flooder, later), Verdict::Pass, "bans expire");
    }

    #[test]
    fn connection_caps_per_source_and_total() {
        let (mut guard, now) = (guard(), Instant::now());
        let (a, b): (IpAddr, IpAddr) = ("192.0.2.1".parse().unwrap(), "192.0.2.2".parse().unwrap());
        assert!(guard.open(a, now).is_ok() && guard.open(a, now).is_ok());
        assert_eq!(guard.open(a, now), Err(Refusal::SourceConnectionCap));
        assert!(guard.open(b, now).is_ok());
        assert_eq!(guard.open(b, now), Err(Refusal::ConnectionCap));
        guard.closed(a);
        assert!(guard.open(b, now).is_ok());
        assert_eq!(guard.connections(), 3);
    }
}
