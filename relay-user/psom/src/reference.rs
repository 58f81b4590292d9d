//! The reference conferencing server: the participants of a conference share one state (a
//! log of what was shared, the last 1 MiB of it); a joining participant receives it, and
//! every update from one participant goes to all the others. Counts sessions and bytes, so
//! tests can tell that nothing reached it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::mpsc;
use tracing::{debug, info};

use crate::frame::Assign;
use crate::internal::Session;

/// The shared state kept per conference.
const STATE_LIMIT: usize = 1 << 20;
/// Updates queued for one participant; a participant that falls this far behind is dropped.
const QUEUE: usize = 256;

#[derive(Default)]
pub struct ConferenceServer {
    rooms: Mutex<HashMap<String, Room>>,
    next_member: AtomicU64,
    sessions: AtomicU64,
    bytes_received: AtomicU64,
    bytes_sent: AtomicU64,
}

#[derive(Default)]
struct Room {
    state: Vec<u8>,
    members: HashMap<u64, mpsc::Sender<Arc<[u8]>>>,
}

/// What the server has seen.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Participants the edge handed over.
    pub sessions: u64,
    /// Bytes received from participants.
    pub bytes_received: u64,
    pub bytes_sent: u64,
}

impl ConferenceServer {
    pub fn new() -> Arc<ConferenceServer> {
        Arc::new(ConferenceServer::default())
    }

    pub fn stats(&self) -> Stats {
        Stats {
            sessions: self.sessions.load(Ordering::Relaxed),
            bytes_received: self.bytes_received.load(Ordering::Relaxed),
            bytes_sent: self.bytes_sent.load(Ordering::Relaxed),
        }
    }

    /// Serves one participant until either side closes.
    pub async fn serve(self: Arc<Self>, assign: Assign, session: Session) {
        self.sessions.fetch_add(1, Ordering::Relaxed);
        let member = self.next_member.fetch_add(1, Ordering::Relaxed);
        let conference = assign.conference_id.clone();
        info!(%conference, participant = %assign.display_name, client = %assign.client, anonymous = assign.anonymous, "participant joined");
        let (tx, mut rx) = mpsc::channel::<Arc<[u8]>>(QUEUE);
        let snapshot = {
            let mut rooms = lock(&self.rooms);
            let room = rooms.entry(conference.clone()).or_default();
            room.members.insert(member, tx);
            room.state.clone()
        };
        let (mut reader, mut writer) = tokio::io::split(session);
        let server = self.clone();
        let writing = tokio::spawn(async move {
            if !snapshot.is_empty() {
                if writer.write_all(&snapshot).await.is_err() {
                    return;
                }
                server
                    .bytes_sent
                    .fetch_add(snapshot.len() as u64, Ordering::Relaxed);
            }
            while let Some(update) = rx.recv().await {
                if writer.write_all(&update).await.is_err() {
                    return;
                }
                server
                    .bytes_sent
                    .fetch_add(update.len() as u64, Ordering::Relaxed);
            }
            let _ = writer.shutdown().await;
        });
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match reader.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            self.bytes_received.fetch_add(n as u64, Ordering::Relaxed);
            let update: Arc<[u8]> = Arc::from(&buf[..n]);
            let mut rooms = lock(&self.rooms);
            let Some(room) = rooms.get_mut(&conference) else {
                break;
            };
            room.state.extend_from_slice(&update);
            if room.state.len() > STATE_LIMIT {
                let excess = room.state.len() - STATE_LIMIT;
                room.state.drain(..excess);
            }
            room.members.retain(|id, other| {
                *id == member
                    || match other.try_send(update.clone()) {
                        Ok(()) => true,
                        Err(_) => {
                            debug!(%conference, member = id, "participant too slow; dropped");
                            false
                        }
                    }
            });
        }
        {
            let mut rooms = lock(&self.rooms);
            if let Some(room) = rooms.get_mut(&conference) {
                room.members.remove(&member);
                if room.members.is_empty() {
                    rooms.remove(&conference);
                }
            }
        }
        writing.abort();
        info!(%conference, participant = %assign.display_name, "participant left");
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
