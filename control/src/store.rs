//! The control state on disk: one redb file (no server to run), written with a durable
//! commit per change, so a control restart loses nothing that was acknowledged.
//!
//! Records are the protobuf messages of the `v1` contract, encoded with prost: protobuf is
//! built to be read by newer code (unknown fields skipped, new fields defaulted), which is
//! what a database that outlives binaries needs. Every change to state that agents receive
//! (policy, conferences, revocations) bumps one revision counter in the same transaction.
//!
//! All calls block (file I/O and fsync); async callers run them on the blocking pool.

use std::path::{Path, PathBuf};

use prost::Message;
use redb::{Database, ReadableDatabase as _, ReadableTable as _, TableDefinition};

use proto::control::v1::{
    AccessPolicy, AgentRegistration, Conference, MediaAuthorization, UserRevocation,
};

const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const POLICY: TableDefinition<&str, &[u8]> = TableDefinition::new("policy");
const CONFERENCES: TableDefinition<&str, &[u8]> = TableDefinition::new("conferences");
const REVOCATIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("revocations");
const AGENTS: TableDefinition<&str, &[u8]> = TableDefinition::new("agents");
/// Media authorizations by "external\ninternal" (user identities have no whitespace).
const AUTHORIZATIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("media_authorizations");

const SCHEMA_KEY: &str = "schema_version";
const REVISION_KEY: &str = "revision";
const POLICY_KEY: &str = "current";
/// Bumped when a record's meaning changes incompatibly; an older binary then refuses the
/// file instead of misreading it.
const SCHEMA_VERSION: u64 = 1;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the database {}: {source}", path.display())]
    Open {
        path: PathBuf,
        source: redb::DatabaseError,
    },
    #[error(
        "the database uses schema {found}, this binary knows {SCHEMA_VERSION}: it was written by \
         a newer rampart-control; run that version or restore a backup"
    )]
    Schema { found: u64 },
    #[error("database: {0}")]
    Db(#[from] redb::Error),
    #[error("corrupt {table} record {key:?}: {source}")]
    Corrupt {
        table: &'static str,
        key: String,
        source: prost::DecodeError,
    },
    #[error("conference {0:?} is already registered")]
    ConferenceExists(String),
    #[error("conference {0:?} is not registered")]
    ConferenceMissing(String),
}

macro_rules! from_redb {
    ($($error:ty),*) => {$(
        impl From<$error> for StoreError {
            fn from(error: $error) -> Self {
                StoreError::Db(error.into())
            }
        }
    )*};
}
from_redb!(
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

/// Everything an agent needs, as of one revision.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StateSnapshot {
    pub revision: u64,
    pub policy: AccessPolicy,
    pub conferences: Vec<Conference>,
    pub revocations: Vec<UserRevocation>,
    pub media_authorizations: Vec<MediaAuthorization>,
}

pub struct Store {
    db: Database,
}

fn decode<M: Message + Default>(
    table: &'static str,
    key: &str,
    bytes: &[u8],
) -> Result<M, StoreError> {
    M::decode(bytes).map_err(|source| StoreError::Corrupt {
        table,
        key: key.to_owned(),
        source,
    })
}

fn bump(meta: &mut redb::Table<&str, u64>) -> Result<u64, StoreError> {
    let revision = meta.get(REVISION_KEY)?.map_or(0, |v| v.value()) + 1;
    meta.insert(REVISION_KEY, revision)?;
    Ok(revision)
}

impl Store {
    /// Opens the database at `path`, creating it (and its tables) if missing.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let db = Database::create(path).map_err(|source| StoreError::Open {
            path: path.to_owned(),
            source,
        })?;
        let txn = db.begin_write()?;
        {
            let mut meta = txn.open_table(META)?;
            let found = meta.get(SCHEMA_KEY)?.map(|v| v.value());
            match found {
                None => {
                    meta.insert(SCHEMA_KEY, SCHEMA_VERSION)?;
                }
                Some(SCHEMA_VERSION) => {}
                Some(found) => return Err(StoreError::Schema { found }),
            }
            // Opening creates the tables, so later read transactions find them.
            txn.open_table(POLICY)?;
            txn.open_table(CONFERENCES)?;
            txn.open_table(REVOCATIONS)?;
            txn.open_table(AGENTS)?;
            txn.open_table(AUTHORIZATIONS)?;
        }
        txn.commit()?;
        Ok(Store { db })
    }

    /// The current revision.
    pub fn revision(&self) -> Result<u64, StoreError> {
        let txn = self.db.begin_read()?;
        let meta = txn.open_table(META)?;
        Ok(meta.get(REVISION_KEY)?.map_or(0, |v| v.value()))
    }

    /// The whole distributed state at one revision (one read transaction, so consistent):
    /// conferences that have not expired at `now_unix`, revocations still in force.
    pub fn snapshot(&self, now_unix: u64) -> Result<StateSnapshot, StoreError> {
        let txn = self.db.begin_read()?;
        let meta = txn.open_table(META)?;
        let policy = txn.open_table(POLICY)?;
        let conferences = txn.open_table(CONFERENCES)?;
        let revocations = txn.open_table(REVOCATIONS)?;
        let authorizations = txn.open_table(AUTHORIZATIONS)?;
        let policy = match policy.get(POLICY_KEY)? {
            Some(bytes) => decode("policy", POLICY_KEY, bytes.value())?,
            None => AccessPolicy::default(),
        };
        let mut snapshot = StateSnapshot {
            revision: meta.get(REVISION_KEY)?.map_or(0, |v| v.value()),
            policy,
            ..StateSnapshot::default()
        };
        for entry in conferences.iter()? {
            let (key, value) = entry?;
            let conference: Conference = decode("conferences", key.value(), value.value())?;
            if conference.expires_at_unix > now_unix {
                snapshot.conferences.push(conference);
            }
        }
        for entry in revocations.iter()? {
            let (key, value) = entry?;
            let revocation: UserRevocation = decode("revocations", key.value(), value.value())?;
            if revocation.refuse_expiry_through_unix >= now_unix {
                snapshot.revocations.push(revocation);
            }
        }
        for entry in authorizations.iter()? {
            let (key, value) = entry?;
            let authorization: MediaAuthorization =
                decode("media_authorizations", key.value(), value.value())?;
            if authorization.expires_at_unix > now_unix {
                snapshot.media_authorizations.push(authorization);
            }
        }
        Ok(snapshot)
    }

    /// The access policy in force and the current revision.
    pub fn policy(&self) -> Result<(AccessPolicy, u64), StoreError> {
        let txn = self.db.begin_read()?;
        let meta = txn.open_table(META)?;
        let table = txn.open_table(POLICY)?;
        let policy = match table.get(POLICY_KEY)? {
            Some(bytes) => decode("policy", POLICY_KEY, bytes.value())?,
            None => AccessPolicy::default(),
        };
        Ok((policy, meta.get(REVISION_KEY)?.map_or(0, |v| v.value())))
    }

    /// Replaces the access policy.
    pub fn set_policy(&self, policy: &AccessPolicy) -> Result<u64, StoreError> {
        let txn = self.db.begin_write()?;
        let revision = {
            let mut meta = txn.open_table(META)?;
            let mut table = txn.open_table(POLICY)?;
            table.insert(POLICY_KEY, policy.encode_to_vec().as_slice())?;
            bump(&mut meta)?
        };
        txn.commit()?;
        Ok(revision)
    }

    /// The conference `id`, if registered (expired or not).
    pub fn conference(&self, id: &str) -> Result<Option<Conference>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(CONFERENCES)?;
        table
            .get(id)?
            .map(|bytes| decode("conferences", id, bytes.value()))
            .transpose()
    }

    /// Registers a new conference. A registered conference that has expired counts as
    /// absent: its id is free again.
    pub fn insert_conference(
        &self,
        conference: &Conference,
        now_unix: u64,
    ) -> Result<u64, StoreError> {
        let txn = self.db.begin_write()?;
        let revision = {
            let mut meta = txn.open_table(META)?;
            let mut table = txn.open_table(CONFERENCES)?;
            let id = conference.conference_id.as_str();
            if let Some(existing) = table.get(id)? {
                let existing: Conference = decode("conferences", id, existing.value())?;
                if existing.expires_at_unix > now_unix {
                    return Err(StoreError::ConferenceExists(id.to_owned()));
                }
            }
            table.insert(id, conference.encode_to_vec().as_slice())?;
            bump(&mut meta)?
        };
        txn.commit()?;
        Ok(revision)
    }

    /// Changes a registered, unexpired conference with `change`.
    pub fn update_conference(
        &self,
        id: &str,
        now_unix: u64,
        change: impl FnOnce(&mut Conference),
    ) -> Result<(Conference, u64), StoreError> {
        let txn = self.db.begin_write()?;
        let result = {
            let mut meta = txn.open_table(META)?;
            let mut table = txn.open_table(CONFERENCES)?;
            let existing = table.get(id)?.map(|bytes| bytes.value().to_vec());
            let mut conference: Conference = match existing {
                Some(bytes) => decode("conferences", id, &bytes)?,
                None => return Err(StoreError::ConferenceMissing(id.to_owned())),
            };
            if conference.expires_at_unix <= now_unix {
                return Err(StoreError::ConferenceMissing(id.to_owned()));
            }
            change(&mut conference);
            table.insert(id, conference.encode_to_vec().as_slice())?;
            (conference, bump(&mut meta)?)
        };
        txn.commit()?;
        Ok(result)
    }

    /// Removes a conference; the new revision, or `None` if there was none.
    pub fn remove_conference(&self, id: &str) -> Result<Option<u64>, StoreError> {
        let txn = self.db.begin_write()?;
        let revision = {
            let mut meta = txn.open_table(META)?;
            let mut table = txn.open_table(CONFERENCES)?;
            if table.remove(id)?.is_none() {
                None
            } else {
                Some(bump(&mut meta)?)
            }
        };
        txn.commit()?;
        Ok(revision)
    }

    /// Removes conferences expired at `now_unix` and revocations no credential can still
    /// need; returns the ids of the removed conferences with the revision of each removal.
    pub fn purge_expired(&self, now_unix: u64) -> Result<Vec<(String, u64)>, StoreError> {
        let txn = self.db.begin_write()?;
        let mut removed = Vec::new();
        {
            let mut meta = txn.open_table(META)?;
            let mut conferences = txn.open_table(CONFERENCES)?;
            let mut expired = Vec::new();
            for entry in conferences.iter()? {
                let (key, value) = entry?;
                let conference: Conference = decode("conferences", key.value(), value.value())?;
                if conference.expires_at_unix <= now_unix {
                    expired.push(key.value().to_owned());
                }
            }
            for id in expired {
                conferences.remove(id.as_str())?;
                let revision = bump(&mut meta)?;
                removed.push((id, revision));
            }
            let mut revocations = txn.open_table(REVOCATIONS)?;
            let mut stale = Vec::new();
            for entry in revocations.iter()? {
                let (key, value) = entry?;
                let revocation: UserRevocation = decode("revocations", key.value(), value.value())?;
                if revocation.refuse_expiry_through_unix < now_unix {
                    stale.push(key.value().to_owned());
                }
            }
            // Every credential a stale revocation refused has expired by now, so agents
            // lose nothing by forgetting it; no update is sent for it.
            for user in stale {
                revocations.remove(user.as_str())?;
            }
            // Agents expire authorizations on their own; no update either.
            let mut authorizations = txn.open_table(AUTHORIZATIONS)?;
            let mut expired = Vec::new();
            for entry in authorizations.iter()? {
                let (key, value) = entry?;
                let authorization: MediaAuthorization =
                    decode("media_authorizations", key.value(), value.value())?;
                if authorization.expires_at_unix <= now_unix {
                    expired.push(key.value().to_owned());
                }
            }
            for key in expired {
                authorizations.remove(key.as_str())?;
            }
        }
        txn.commit()?;
        Ok(removed)
    }

    /// The revocation of `user`, if any.
    pub fn revocation(&self, user: &str) -> Result<Option<UserRevocation>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(REVOCATIONS)?;
        table
            .get(user)?
            .map(|bytes| decode("revocations", user, bytes.value()))
            .transpose()
    }

    /// Records a revocation (replacing an older one of the same user).
    pub fn revoke_user(&self, revocation: &UserRevocation) -> Result<u64, StoreError> {
        let txn = self.db.begin_write()?;
        let revision = {
            let mut meta = txn.open_table(META)?;
            let mut table = txn.open_table(REVOCATIONS)?;
            table.insert(
                revocation.user.as_str(),
                revocation.encode_to_vec().as_slice(),
            )?;
            bump(&mut meta)?
        };
        txn.commit()?;
        Ok(revision)
    }

    /// Records a media authorization (replacing the pair's earlier one).
    pub fn authorize_media(&self, authorization: &MediaAuthorization) -> Result<u64, StoreError> {
        let key = authorization_key(&authorization.external_user, &authorization.internal_user);
        let txn = self.db.begin_write()?;
        let revision = {
            let mut meta = txn.open_table(META)?;
            let mut table = txn.open_table(AUTHORIZATIONS)?;
            table.insert(key.as_str(), authorization.encode_to_vec().as_slice())?;
            bump(&mut meta)?
        };
        txn.commit()?;
        Ok(revision)
    }

    /// Removes a media authorization; the new revision, or `None` if there was none.
    pub fn revoke_media(&self, external: &str, internal: &str) -> Result<Option<u64>, StoreError> {
        let key = authorization_key(external, internal);
        let txn = self.db.begin_write()?;
        let revision = {
            let mut meta = txn.open_table(META)?;
            let mut table = txn.open_table(AUTHORIZATIONS)?;
            if table.remove(key.as_str())?.is_none() {
                None
            } else {
                Some(bump(&mut meta)?)
            }
        };
        txn.commit()?;
        Ok(revision)
    }

    /// Records (or replaces) an agent's registration. Registrations are not sent to agents,
    /// so they do not change the revision.
    pub fn put_agent(&self, registration: &AgentRegistration) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        {
            let mut table = txn.open_table(AGENTS)?;
            table.insert(
                registration.agent_id.as_str(),
                registration.encode_to_vec().as_slice(),
            )?;
        }
        txn.commit()?;
        Ok(())
    }

    /// The registration of agent `id`, if any.
    pub fn agent(&self, id: &str) -> Result<Option<AgentRegistration>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(AGENTS)?;
        table
            .get(id)?
            .map(|bytes| decode("agents", id, bytes.value()))
            .transpose()
    }

    /// Every registered agent, ordered by id.
    pub fn agents(&self) -> Result<Vec<AgentRegistration>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(AGENTS)?;
        let mut agents = Vec::new();
        for entry in table.iter()? {
            let (key, value) = entry?;
            agents.push(decode("agents", key.value(), value.value())?);
        }
        Ok(agents)
    }
}

fn authorization_key(external: &str, internal: &str) -> String {
    format!("{external}\n{internal}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conference(id: &str, expires: u64) -> Conference {
        Conference {
            conference_id: id.into(),
            session_key_sha256: vec![7; 32],
            expires_at_unix: expires,
            anonymous_allowed: true,
            max_participants: 10,
            created_at_unix: 1,
            updated_at_unix: 1,
        }
    }

    #[test]
    fn media_authorizations_are_stored_listed_until_they_expire_and_revoked_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("control.redb")).unwrap();
        let authorization = |external: &str, expires| MediaAuthorization {
            external_user: external.into(),
            internal_user: "sip:bob@example.com".into(),
            expires_at_unix: expires,
        };
        assert_eq!(
            store.authorize_media(&authorization("guest", 100)).unwrap(),
            1
        );
        // Given again, it replaces the earlier one.
        assert_eq!(
            store.authorize_media(&authorization("guest", 200)).unwrap(),
            2
        );
        assert_eq!(
            store.authorize_media(&authorization("other", 50)).unwrap(),
            3
        );
        let snapshot = store.snapshot(60).unwrap();
        assert_eq!(snapshot.media_authorizations, [authorization("guest", 200)]);
        assert_eq!(
            store.revoke_media("guest", "sip:bob@example.com").unwrap(),
            Some(4)
        );
        assert_eq!(
            store.revoke_media("guest", "sip:bob@example.com").unwrap(),
            None
        );
        store.purge_expired(60).unwrap();
        assert_eq!(
            store.revoke_media("other", "sip:bob@example.com").unwrap(),
            None
        );
        assert!(store.snapshot(0).unwrap().media_authorizations.is_empty());
    }

    #[test]
    fn state_survives_reopening_and_revisions_grow() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.redb");
        {
            let store = Store::open(&path).unwrap();
            assert_eq!(store.revision().unwrap(), 0);
            assert_eq!(
                store.insert_conference(&conference("c1", 100), 10).unwrap(),
                1
            );
            let policy = AccessPolicy {
                remote_users_enabled: true,
                ..AccessPolicy::default()
            };
            assert_eq!(store.set_policy(&policy).unwrap(), 2);
        }
        let store = Store::open(&path).unwrap();
        let snapshot = store.snapshot(10).unwrap();
        assert_eq!(snapshot.revision, 2);
        assert!(snapshot.policy.remote_users_enabled);
        assert_eq!(snapshot.conferences, [conference("c1", 100)]);
    }

    #[test]
    fn conferences_register_update_expire_and_remove() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db")).unwrap();
        store.insert_conference(&conference("c1", 100), 10).unwrap();
        assert!(matches!(
            store.insert_conference(&conference("c1", 200), 10),
            Err(StoreError::ConferenceExists(_))
        ));
        let (updated, _) = store
            .update_conference("c1", 10, |c| c.max_participants = 3)
            .unwrap();
        assert_eq!(updated.max_participants, 3);
        assert!(matches!(
            store.update_conference("c2", 10, |_| {}),
            Err(StoreError::ConferenceMissing(_))
        ));
        // Expired: invisible, updatable no more, its id free again.
        assert!(store.snapshot(100).unwrap().conferences.is_empty());
        assert!(store.update_conference("c1", 100, |_| {}).is_err());
        store
            .insert_conference(&conference("c1", 300), 150)
            .unwrap();
        store
            .insert_conference(&conference("c3", 120), 110)
            .unwrap();
        let removed = store.purge_expired(200).unwrap();
        assert_eq!(removed.len(), 1);
        assert_eq!(removed[0].0, "c3");
        assert!(store.remove_conference("c1").unwrap().is_some());
        assert!(store.remove_conference("c1").unwrap().is_none());
    }

    #[test]
    fn revocations_and_agents() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db")).unwrap();
        let revocation = UserRevocation {
            user: "bob".into(),
            revoked_at_unix: 10,
            refuse_expiry_through_unix: 100,
        };
        store.revoke_user(&revocation).unwrap();
        assert_eq!(store.revocation("bob").unwrap(), Some(revocation.clone()));
        assert_eq!(store.snapshot(50).unwrap().revocations, [revocation]);
        store.purge_expired(101).unwrap();
        assert_eq!(store.revocation("bob").unwrap(), None);

        let agent = AgentRegistration {
            agent_id: "a1".into(),
            ..AgentRegistration::default()
        };
        store.put_agent(&agent).unwrap();
        assert_eq!(store.agent("a1").unwrap(), Some(agent.clone()));
        assert_eq!(store.agents().unwrap(), [agent]);
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        {
            let db = Database::create(&path).unwrap();
            let txn = db.begin_write().unwrap();
            txn.open_table(META)
                .unwrap()
                .insert(SCHEMA_KEY, 99)
                .unwrap();
            txn.commit().unwrap();
        }
        assert!(matches!(
            Store::open(&path),
            Err(StoreError::Schema { found: 99 })
        ));
    }
}
