//! The relay-agent API: registration, and the Sync stream that carries the control state
//! to the agent (a snapshot, then every change) and the agent's status back.

use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::{Request, Response, Status, Streaming};

use proto::control::v1::relay_agent_server::RelayAgent;
use proto::control::v1::{
    AddressRole, AgentRegistration, AgentReport, ControlUpdate, RegisterAgentRequest,
    RegisterAgentResponse, agent_report,
};

use super::{Caller, blocking, caller, check_id, invalid, now_unix};
use crate::state::{State, snapshot_update};

/// An agent that opens a stream and says nothing is not an agent we serve.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Updates queued for one agent before the stream applies backpressure.
const OUTBOUND_QUEUE: usize = 64;
/// Addresses an agent may register (internal, external, public, per family, with room).
const MAX_ADDRESSES: usize = 16;

pub struct AgentService {
    state: Arc<State>,
    /// Ends every Sync session on shutdown, so the server's graceful stop does not wait
    /// on streams that never end by themselves.
    shutdown: CancellationToken,
    sessions: TaskTracker,
    /// What agents are told when they register (`[agents] report_interval`).
    report_interval: Duration,
}

impl AgentService {
    pub fn new(
        state: Arc<State>,
        shutdown: CancellationToken,
        sessions: TaskTracker,
        report_interval: Duration,
    ) -> Self {
        AgentService {
            state,
            shutdown,
            sessions,
            report_interval,
        }
    }
}

type UpdateStream = Pin<Box<dyn tokio_stream::Stream<Item = Result<ControlUpdate, Status>> + Send>>;

#[tonic::async_trait]
impl RelayAgent for AgentService {
    async fn register_agent(
        &self,
        request: Request<RegisterAgentRequest>,
    ) -> Result<Response<RegisterAgentResponse>, Status> {
        let caller = caller(&request)?;
        let request = request.into_inner();
        check_id("agent_id", &request.agent_id)?;
        if request.addresses.is_empty() || request.addresses.len() > MAX_ADDRESSES {
            return Err(invalid(
                "addresses",
                format!("an agent has 1 to {MAX_ADDRESSES} addresses"),
            ));
        }
        for (index, address) in request.addresses.iter().enumerate() {
            let field = format!("addresses[{index}]");
            if !matches!(
                address.role(),
                AddressRole::Internal | AddressRole::External | AddressRole::Public
            ) {
                return Err(invalid(&field, "role must be INTERNAL, EXTERNAL or PUBLIC"));
            }
            if address.ip.parse::<IpAddr>().is_err() {
                return Err(invalid(
                    &field,
                    format!("{:?} is not an IP address (without port)", address.ip),
                ));
            }
        }
        let capacity = request.capacity.unwrap_or_default();
        if capacity.relay_port_min > capacity.relay_port_max || capacity.relay_port_max > 65_535 {
            return Err(invalid(
                "capacity",
                "relay_port_min must be at most relay_port_max, and both at most 65535",
            ));
        }
        // An agent id belongs to the certificate identity that registered it: another agent's
        // certificate may not take over a connected agent's id (and with it its reports).
        let id = request.agent_id.clone();
        let previous = blocking(&self.state, move |state| state.store().agent(&id)).await?;
        if let Some(previous) = previous
            && previous.certificate_identity != caller.identity()
        {
            let connected = self
                .state
                .live_agents()
                .get(&request.agent_id)
                .is_some_and(|live| live.connected);
            if connected {
                return Err(Status::permission_denied(format!(
                    "agent {:?} is connected with another certificate ({}); an agent id belongs \
                     to one certificate identity while it is connected",
                    request.agent_id, previous.certificate_identity
                )));
            }
            tracing::warn!(
                agent = %request.agent_id,
                from = %previous.certificate_identity,
                to = %caller.identity(),
                "agent id moves to another certificate identity"
            );
        }
        let registration = AgentRegistration {
            agent_id: request.agent_id,
            addresses: request.addresses,
            capacity: Some(capacity),
            software_version: request.software_version,
            certificate_identity: caller.identity(),
            registered_at_unix: now_unix(),
        };
        let stored = registration.clone();
        blocking(&self.state, move |state| state.store().put_agent(&stored)).await?;
        tracing::info!(
            agent = %registration.agent_id,
            identity = %registration.certificate_identity,
            peer = %caller.peer,
            "agent registered"
        );
        Ok(Response::new(RegisterAgentResponse {
            registration: Some(registration),
            report_interval_seconds: u32::try_from(self.report_interval.as_secs())
                .unwrap_or(u32::MAX),
        }))
    }

    type SyncStream = UpdateStream;

    async fn sync(
        &self,
        request: Request<Streaming<AgentReport>>,
    ) -> Result<Response<Self::SyncStream>, Status> {
        let caller = caller(&request)?;
        let mut inbound = request.into_inner();
        let first = tokio::select! {
            () = self.shutdown.cancelled() => {
                return Err(Status::unavailable("the control service is stopping"));
            }
            first = tokio::time::timeout(HELLO_TIMEOUT, inbound.message()) => first
                .map_err(|_| Status::deadline_exceeded("no AgentHello within 10 seconds"))??,
        };
        let agent_id = match first.and_then(|report| report.report) {
            Some(agent_report::Report::Hello(hello)) => hello.agent_id,
            _ => {
                return Err(Status::failed_precondition(
                    "the first message of a Sync stream must be an AgentHello",
                ));
            }
        };
        check_id("hello.agent_id", &agent_id)?;
        let id = agent_id.clone();
        let registered = blocking(&self.state, move |state| state.store().agent(&id)).await?;
        let Some(registered) = registered else {
            return Err(Status::failed_precondition(format!(
                "agent {agent_id:?} is not registered; call RegisterAgent first"
            )));
        };
        if registered.certificate_identity != caller.identity() {
            return Err(Status::permission_denied(format!(
                "agent {agent_id:?} is registered to another certificate ({}); call \
                 RegisterAgent with this one first",
                registered.certificate_identity
            )));
        }

        // Subscribe before taking the snapshot: a change committed in between is then both
        // in the snapshot and in the subscription, and is skipped by revision below.
        let updates = self.state.subscribe();
        let now = now_unix();
        let snapshot = blocking(&self.state, move |state| state.snapshot(now)).await?;
        let (session, cancel) = self.state.open_session(&agent_id, &self.shutdown);
        let (sender, receiver) = mpsc::channel(OUTBOUND_QUEUE);
        tracing::info!(
            agent = %agent_id,
            session,
            peer = %caller.peer,
            revision = snapshot.revision,
            "agent sync stream opened"
        );
        let revision = snapshot.revision;
        if sender.send(Ok(snapshot_update(snapshot))).await.is_err() {
            self.state.close_session(&agent_id, session);
            return Err(Status::cancelled("the agent went away"));
        }
        let session = Session {
            state: self.state.clone(),
            caller,
            agent_id,
            session,
            sent_revision: revision,
        };
        self.sessions
            .spawn(session.run(inbound, updates, sender, cancel));
        Ok(Response::new(Box::pin(ReceiverStream::new(receiver))))
    }
}

/// One agent's Sync stream after the snapshot.
struct Session {
    state: Arc<State>,
    caller: Arc<Caller>,
    agent_id: String,
    session: u64,
    /// The revision the agent holds once it applies what was sent.
    sent_revision: u64,
}

impl Session {
    async fn run(
        mut self,
        mut inbound: Streaming<AgentReport>,
        mut updates: broadcast::Receiver<Arc<ControlUpdate>>,
        sender: mpsc::Sender<Result<ControlUpdate, Status>>,
        cancel: CancellationToken,
    ) {
        let reason = loop {
            tokio::select! {
                () = cancel.cancelled() => break "replaced by a newer stream, or shutting down",
                () = sender.closed() => break "the agent closed the stream",
                update = updates.recv() => {
                    let update = match update {
                        Ok(update) if update.revision <= self.sent_revision => continue,
                        Ok(update) => ControlUpdate::clone(&update),
                        Err(broadcast::error::RecvError::Lagged(missed)) => {
                            tracing::warn!(agent = %self.agent_id, missed, "agent fell behind; sending a fresh snapshot");
                            let now = now_unix();
                            let state = self.state.clone();
                            match tokio::task::spawn_blocking(move || state.snapshot(now)).await {
                                Ok(Ok(snapshot)) => snapshot_update(snapshot),
                                _ => break "the control state is unavailable",
                            }
                        }
                        Err(broadcast::error::RecvError::Closed) => break "shutting down",
                    };
                    self.sent_revision = update.revision;
                    // An agent that stops reading fills its queue; the send must still give
                    // way to shutdown and to a newer stream of the same agent.
                    tokio::select! {
                        () = cancel.cancelled() => break "replaced by a newer stream, or shutting down",
                        sent = sender.send(Ok(update)) => if sent.is_err() {
                            break "the agent closed the stream";
                        },
                    }
                }
                report = inbound.message() => match report {
                    Ok(Some(AgentReport { report: Some(agent_report::Report::Status(status)) })) => {
                        self.state.record_status(&self.agent_id, self.session, status, now_unix());
                    }
                    Ok(Some(_)) => {
                        let _ = sender
                            .send(Err(Status::invalid_argument(
                                "after the AgentHello, an agent sends only AgentStatus",
                            )))
                            .await;
                        break "protocol error";
                    }
                    Ok(None) => break "the agent ended its reports",
                    Err(_) => break "the stream failed",
                },
            }
        };
        self.state.close_session(&self.agent_id, self.session);
        tracing::info!(
            agent = %self.agent_id,
            session = self.session,
            peer = %self.caller.peer,
            reason,
            "agent sync stream closed"
        );
    }
}
