//! The service's shared state: the durable store, the stream of changes sent to agents, and
//! what connected agents last reported (kept in memory only: it is live data that agents
//! send again within one report interval after a restart).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use proto::control::v1::{
    AccessPolicy, AgentStatus, Conference, ConferenceRemoved, ControlUpdate, MediaAuthorization,
    MediaAuthorizationRevoked, Snapshot, UserRevocation, control_update,
};

use crate::store::{StateSnapshot, Store, StoreError};

/// How many changes a slow agent stream may fall behind before it gets a fresh snapshot
/// instead of the changes it missed.
const UPDATE_BACKLOG: usize = 1024;

/// What one agent's open Sync stream last said.
#[derive(Clone, Debug)]
pub struct LiveAgent {
    /// Identifies the stream; a newer stream of the same agent replaces it.
    pub session: u64,
    pub connected: bool,
    pub last_report_unix: u64,
    pub status: Option<AgentStatus>,
    cancel: CancellationToken,
}

pub struct State {
    store: Store,
    /// Held across "commit, then broadcast" so updates reach agents in revision order.
    write_order: Mutex<()>,
    updates: broadcast::Sender<Arc<ControlUpdate>>,
    agents: Mutex<HashMap<String, LiveAgent>>,
    next_session: Mutex<u64>,
}

/// A lock that a panic elsewhere poisoned still guards consistent data here (every critical
/// section either completes or changes nothing), so keep going rather than cascade panics.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl State {
    pub fn new(store: Store) -> State {
        State {
            store,
            write_order: Mutex::new(()),
            updates: broadcast::channel(UPDATE_BACKLOG).0,
            agents: Mutex::new(HashMap::new()),
            next_session: Mutex::new(0),
        }
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Changes to come. Subscribe before reading a snapshot, so no change falls between.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<ControlUpdate>> {
        self.updates.subscribe()
    }

    /// Runs a store write and publishes the update it produces, in revision order.
    fn write<T>(
        &self,
        change: impl FnOnce(&Store) -> Result<(T, Option<ControlUpdate>), StoreError>,
    ) -> Result<T, StoreError> {
        let _order = lock(&self.write_order);
        let (result, update) = change(&self.store)?;
        if let Some(update) = update {
            // No receiver (no agent connected) is not an error: agents get a snapshot.
            let _ = self.updates.send(Arc::new(update));
        }
        Ok(result)
    }

    pub fn set_policy(&self, policy: AccessPolicy) -> Result<u64, StoreError> {
        self.write(|store| {
            let revision = store.set_policy(&policy)?;
            Ok((
                revision,
                Some(ControlUpdate {
                    revision,
                    update: Some(control_update::Update::Policy(policy)),
                }),
            ))
        })
    }

    pub fn register_conference(
        &self,
        conference: Conference,
        now_unix: u64,
    ) -> Result<u64, StoreError> {
        self.write(|store| {
            let revision = store.insert_conference(&conference, now_unix)?;
            Ok((
                revision,
                Some(ControlUpdate {
                    revision,
                    update: Some(control_update::Update::ConferenceUpserted(conference)),
                }),
            ))
        })
    }

    pub fn update_conference(
        &self,
        id: &str,
        now_unix: u64,
        change: impl FnOnce(&mut Conference),
    ) -> Result<(Conference, u64), StoreError> {
        self.write(|store| {
            let (conference, revision) = store.update_conference(id, now_unix, change)?;
            let update = ControlUpdate {
                revision,
                update: Some(control_update::Update::ConferenceUpserted(
                    conference.clone(),
                )),
            };
            Ok(((conference, revision), Some(update)))
        })
    }

    /// The new revision, or `None` if there was no such conference.
    pub fn revoke_conference(&self, id: &str) -> Result<Option<u64>, StoreError> {
        self.write(|store| {
            let revision = store.remove_conference(id)?;
            let update = revision.map(|revision| removed(id, revision));
            Ok((revision, update))
        })
    }

    pub fn revoke_user(&self, revocation: UserRevocation) -> Result<u64, StoreError> {
        self.write(|store| {
            let revision = store.revoke_user(&revocation)?;
            Ok((
                revision,
                Some(ControlUpdate {
                    revision,
                    update: Some(control_update::Update::UserRevoked(revocation)),
                }),
            ))
        })
    }

    pub fn authorize_media(&self, authorization: MediaAuthorization) -> Result<u64, StoreError> {
        self.write(|store| {
            let revision = store.authorize_media(&authorization)?;
            Ok((
                revision,
                Some(ControlUpdate {
                    revision,
                    update: Some(control_update::Update::MediaAuthorized(authorization)),
                }),
            ))
        })
    }

    /// The new revision, or `None` if there was no such authorization.
    pub fn revoke_media(&self, external: &str, internal: &str) -> Result<Option<u64>, StoreError> {
        self.write(|store| {
            let revision = store.revoke_media(external, internal)?;
            let update = revision.map(|revision| ControlUpdate {
                revision,
                update: Some(control_update::Update::MediaAuthorizationRevoked(
                    MediaAuthorizationRevoked {
                        external_user: external.to_owned(),
                        internal_user: internal.to_owned(),
                    },
                )),
            });
            Ok((revision, update))
        })
    }

    /// Forgets expired conferences (telling agents) and stale revocations.
    pub fn purge_expired(&self, now_unix: u64) -> Result<usize, StoreError> {
        let _order = lock(&self.write_order);
        let removed_conferences = self.store.purge_expired(now_unix)?;
        for (id, revision) in &removed_conferences {
            let _ = self.updates.send(Arc::new(removed(id, *revision)));
        }
        Ok(removed_conferences.len())
    }

    pub fn snapshot(&self, now_unix: u64) -> Result<StateSnapshot, StoreError> {
        self.store.snapshot(now_unix)
    }

    /// Starts a Sync session for `agent_id`, ending the agent's previous one: an agent that
    /// reconnects after a network failure may do so before the server noticed the old
    /// stream died, and the old one must not keep overwriting its reports.
    pub fn open_session(
        &self,
        agent_id: &str,
        parent: &CancellationToken,
    ) -> (u64, CancellationToken) {
        let session = {
            let mut next = lock(&self.next_session);
            *next += 1;
            *next
        };
        let cancel = parent.child_token();
        let mut agents = lock(&self.agents);
        let previous = agents.insert(
            agent_id.to_owned(),
            LiveAgent {
                session,
                connected: true,
                last_report_unix: 0,
                status: None,
                cancel: cancel.clone(),
            },
        );
        if let Some(previous) = previous {
            previous.cancel.cancel();
            if let Some(entry) = agents.get_mut(agent_id) {
                // Keep showing the last report until the new stream sends one.
                entry.last_report_unix = previous.last_report_unix;
                entry.status = previous.status;
            }
        }
        (session, cancel)
    }

    pub fn record_status(&self, agent_id: &str, session: u64, status: AgentStatus, now_unix: u64) {
        let mut agents = lock(&self.agents);
        if let Some(live) = agents.get_mut(agent_id)
            && live.session == session
        {
            live.last_report_unix = now_unix;
            live.status = Some(status);
        }
    }

    pub fn close_session(&self, agent_id: &str, session: u64) {
        let mut agents = lock(&self.agents);
        if let Some(live) = agents.get_mut(agent_id)
            && live.session == session
        {
            live.connected = false;
        }
    }

    /// What each agent last reported, by agent id.
    pub fn live_agents(&self) -> HashMap<String, LiveAgent> {
        lock(&self.agents).clone()
    }
}

fn removed(id: &str, revision: u64) -> ControlUpdate {
    ControlUpdate {
        revision,
        update: Some(control_update::Update::ConferenceRemoved(
            ConferenceRemoved {
                conference_id: id.to_owned(),
            },
        )),
    }
}

/// The update that replaces an agent's whole state.
pub fn snapshot_update(snapshot: StateSnapshot) -> ControlUpdate {
    ControlUpdate {
        revision: snapshot.revision,
        update: Some(control_update::Update::Snapshot(Snapshot {
            policy: Some(snapshot.policy),
            conferences: snapshot.conferences,
            revocations: snapshot.revocations,
            media_authorizations: snapshot.media_authorizations,
        })),
    }
}
