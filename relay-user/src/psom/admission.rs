//! Who may join which conference: the conferences the control plane registered (with the
//! SHA-256 of their session keys), what was removed and why, and how many participants each
//! has on this edge. Pure state: fed conferences, joins and the time.

use std::collections::{BTreeMap, HashMap};

use proto::control::v1::{Conference, ConferenceCounters};
use serde::Serialize;
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq as _;

use rampart_psom::frame::{Join, RejectReason};

/// Removed conferences remembered (to say "revoked" rather than "unknown"), at most.
const REMEMBERED_REMOVALS: usize = 10_000;

/// Joins and bytes, for the counters line and the control plane.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ConferencingCounters {
    pub joins_accepted: u64,
    /// Refused joins by reason (`wrong_key`, `expired`, ...).
    pub joins_rejected: BTreeMap<&'static str, u64>,
    pub participants: u64,
    pub bytes_from_clients: u64,
    pub bytes_to_clients: u64,
    pub internal_connections_idle: u64,
    pub connections_refused: u64,
}

#[derive(Default)]
struct PerConference {
    active: u32,
    joins: u64,
    refused: u64,
}

#[derive(Default)]
pub struct Admission {
    conferences: HashMap<String, Conference>,
    /// Removed conferences: revoked (removed before their expiry) or expired, with when.
    removed: HashMap<String, (RejectReason, u64)>,
    per_conference: HashMap<String, PerConference>,
    pub counters: ConferencingCounters,
}

impl Admission {
    /// A conference registered or updated.
    pub fn upsert(&mut self, conference: Conference) {
        self.removed.remove(&conference.conference_id);
        self.conferences
            .insert(conference.conference_id.clone(), conference);
    }

    /// A conference removed by the control plane; true if it had participants here (they
    /// are to be disconnected).
    pub fn remove(&mut self, conference_id: &str, now_unix: u64) -> bool {
        if let Some(conference) = self.conferences.remove(conference_id) {
            let reason = if conference.expires_at_unix > now_unix {
                RejectReason::Revoked
            } else {
                RejectReason::Expired
            };
            if self.removed.len() >= REMEMBERED_REMOVALS
                && let Some(oldest) = self
                    .removed
                    .iter()
                    .min_by_key(|(_, (_, at))| *at)
                    .map(|(id, _)| id.clone())
            {
                self.removed.remove(&oldest);
            }
            self.removed
                .insert(conference_id.to_owned(), (reason, now_unix));
        }
        self.per_conference
            .get(conference_id)
            .is_some_and(|p| p.active > 0)
    }

    /// The whole set (a control snapshot): conferences missing from it are removed. Returns
    /// the removed ones that had participants.
    pub fn replace_all(&mut self, conferences: Vec<Conference>, now_unix: u64) -> Vec<String> {
        let keep: std::collections::HashSet<String> = conferences
            .iter()
            .map(|c| c.conference_id.clone())
            .collect();
        let gone: Vec<String> = self
            .conferences
            .keys()
            .filter(|id| !keep.contains(*id))
            .cloned()
            .collect();
        let mut disconnect = Vec::new();
        for id in gone {
            if self.remove(&id, now_unix) {
                disconnect.push(id);
            }
        }
        for conference in conferences {
            self.upsert(conference);
        }
        disconnect
    }

    pub fn conference_count(&self) -> usize {
        self.conferences.len()
    }

    /// Admits `join` now or says why not; an admitted participant counts until [`leave`].
    ///
    /// [`leave`]: Admission::leave
    pub fn admit(&mut self, join: &Join, now_unix: u64) -> Result<(), RejectReason> {
        let decision = self.decide(join, now_unix);
        let entry = self
            .per_conference
            .entry(join.conference_id.clone())
            .or_default();
        match decision {
            Ok(()) => {
                entry.active += 1;
                entry.joins += 1;
                self.counters.joins_accepted += 1;
                self.counters.participants += 1;
            }
            Err(reason) => {
                entry.refused += 1;
                if entry.active == 0
                    && entry.joins == 0
                    && !self.conferences.contains_key(&join.conference_id)
                {
                    // Unknown ids are not remembered: a scan of random ids must not grow state.
                    self.per_conference.remove(&join.conference_id);
                }
                self.reject(reason);
            }
        }
        decision
    }

    /// Counts a refusal decided outside [`Admission::admit`] (timeouts, malformed joins, no
    /// internal server).
    pub fn reject(&mut self, reason: RejectReason) {
        *self
            .counters
            .joins_rejected
            .entry(reason.name())
            .or_default() += 1;
    }

    /// An admitted participant who could not be connected after all (no internal server in
    /// time): not a join but a refusal for `reason`.
    pub fn withdraw(&mut self, conference_id: &str, reason: RejectReason) {
        if let Some(entry) = self.per_conference.get_mut(conference_id) {
            entry.active = entry.active.saturating_sub(1);
            entry.joins = entry.joins.saturating_sub(1);
            entry.refused += 1;
        }
        self.counters.joins_accepted = self.counters.joins_accepted.saturating_sub(1);
        self.counters.participants = self.counters.participants.saturating_sub(1);
        self.reject(reason);
    }

    /// An admitted participant left.
    pub fn leave(&mut self, conference_id: &str) {
        if let Some(entry) = self.per_conference.get_mut(conference_id) {
            entry.active = entry.active.saturating_sub(1);
        }
        self.counters.participants = self.counters.participants.saturating_sub(1);
    }

    /// Per-conference counters for the control plane (conferences with any activity).
    pub fn conference_counters(&self) -> Vec<ConferenceCounters> {
        self.per_conference
            .iter()
            .map(|(id, p)| ConferenceCounters {
                conference_id: id.clone(),
                active_participants: p.active,
                joins_total: p.joins,
                joins_refused: p.refused,
            })
            .collect()
    }

    fn decide(&self, join: &Join, now_unix: u64) -> Result<(), RejectReason> {
        let Some(conference) = self.conferences.get(&join.conference_id) else {
            return Err(self
                .removed
                .get(&join.conference_id)
                .map_or(RejectReason::UnknownConference, |(reason, _)| *reason));
        };
        let digest = Sha256::digest(&join.key);
        let matches: bool = digest
            .as_slice()
            .ct_eq(conference.session_key_sha256.as_slice())
            .into();
        if !matches {
            return Err(RejectReason::WrongKey);
        }
        if conference.expires_at_unix <= now_unix {
            return Err(RejectReason::Expired);
        }
        if join.anonymous && !conference.anonymous_allowed {
            return Err(RejectReason::AnonymousNotAllowed);
        }
        let active = self
            .per_conference
            .get(&join.conference_id)
            .map_or(0, |p| p.active);
        if conference.max_participants > 0 && active >= conference.max_participants {
            return Err(RejectReason::Full);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000;

    fn conference(id: &str, key: &[u8], anonymous_allowed: bool, cap: u32) -> Conference {
        Conference {
            conference_id: id.into(),
            session_key_sha256: Sha256::digest(key).to_vec(),
            expires_at_unix: NOW + 600,
            anonymous_allowed,
            max_participants: cap,
            created_at_unix: NOW,
            updated_at_unix: NOW,
        }
    }

    fn join(id: &str, key: &[u8], anonymous: bool) -> Join {
        Join {
            conference_id: id.into(),
            key: key.to_vec(),
            anonymous,
            display_name: "p".into(),
        }
    }

    #[test]
    fn each_refusal_has_its_reason() {
        let mut admission = Admission::default();
        admission.upsert(conference("open", b"k1", true, 0));
        admission.upsert(conference("members", b"k2", false, 2));
        admission.upsert(conference("cancelled", b"k3", true, 0));
        admission.upsert(conference("over", b"k4", true, 0));

        assert_eq!(admission.admit(&join("open", b"k1", true), NOW), Ok(()));
        assert_eq!(
            admission.admit(&join("open", b"k2", false), NOW),
            Err(RejectReason::WrongKey)
        );
        assert_eq!(
            admission.admit(&join("nope", b"k1", false), NOW),
            Err(RejectReason::UnknownConference)
        );
        assert_eq!(
            admission.admit(&join("members", b"k2", true), NOW),
            Err(RejectReason::AnonymousNotAllowed)
        );
        assert_eq!(admission.admit(&join("members", b"k2", false), NOW), Ok(()));
        assert_eq!(admission.admit(&join("members", b"k2", false), NOW), Ok(()));
        assert_eq!(
            admission.admit(&join("members", b"k2", false), NOW),
            Err(RejectReason::Full)
        );
        admission.leave("members");
        assert_eq!(admission.admit(&join("members", b"k2", false), NOW), Ok(()));
        assert_eq!(
            admission.admit(&join("open", b"k1", true), NOW + 600),
            Err(RejectReason::Expired)
        );

        // Removed before its expiry: revoked; after: expired; both remembered.
        assert!(!admission.remove("cancelled", NOW));
        assert!(!admission.remove("over", NOW + 601));
        assert_eq!(
            admission.admit(&join("cancelled", b"k3", true), NOW),
            Err(RejectReason::Revoked)
        );
        assert_eq!(
            admission.admit(&join("over", b"k4", true), NOW),
            Err(RejectReason::Expired)
        );
        // Registered again: admitted again.
        admission.upsert(conference("cancelled", b"k3", true, 0));
        assert_eq!(
            admission.admit(&join("cancelled", b"k3", true), NOW),
            Ok(())
        );

        let c = &admission.counters;
        assert_eq!(c.joins_accepted, 5);
        assert_eq!(c.joins_rejected["wrong_key"], 1);
        assert_eq!(c.joins_rejected["unknown_conference"], 1);
        assert_eq!(c.joins_rejected["anonymous_not_allowed"], 1);
        assert_eq!(c.joins_rejected["full"], 1);
        assert_eq!(c.joins_rejected["expired"], 2);
        assert_eq!(c.joins_rejected["revoked"], 1);
    }

    #[test]
    fn removing_a_conference_with_participants_asks_to_disconnect_them() {
        let mut admission = Admission::default();
        admission.upsert(conference("a", b"k", true, 0));
        admission.upsert(conference("b", b"k", true, 0));
        admission.admit(&join("a", b"k", true), NOW).unwrap();
        // A snapshot without "a": its participant goes.
        let gone = admission.replace_all(vec![conference("b", b"k", true, 0)], NOW);
        assert_eq!(gone, ["a"]);
        assert_eq!(admission.conference_count(), 1);
        let counters = admission.conference_counters();
        let a = counters.iter().find(|c| c.conference_id == "a").unwrap();
        assert_eq!((a.active_participants, a.joins_total), (1, 1));
        admission.leave("a");
        assert_eq!(admission.counters.participants, 0);
    }

    #[test]
    fn unknown_ids_leave_no_state_behind() {
        let mut admission = Admission::default();
        for i in 0..1000 {
            let _ = admission.admit(&join(&format!("guess-{i}"), b"k", true), NOW);
        }
        assert!(admission.conference_counters().is_empty());
        assert_eq!(
            admission.counters.joins_rejected["unknown_conference"],
            1000
        );
    }
}
