//! The agent's link to the control service (`[control]`): register over mutual TLS, keep one
//! Sync stream open, apply what arrives (access policy, user revocations, conference keys)
//! to the state machine, and report health and counters on the same stream.
//!
//! The link is never needed to serve: credentials are verified locally, so while control is
//! unreachable the agent keeps serving with the last state it received, reconnects with a
//! bounded, jittered exponential backoff and resynchronises from the snapshot every new
//! stream starts with. An outage is logged once, and reported in the health sent once the
//! link is back (`stale_since_unix`) until the snapshot has been applied.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ipnet::IpNet;
use proto::control::v1::relay_agent_client::RelayAgentClient;
use proto::control::v1::{
    AccessPolicy, AddressRole, AgentAddress, AgentCapacity, AgentHealth, AgentHello, AgentReport,
    AgentStatus, AllocationSummary, ClientTransport, ControlUpdate, HealthState,
    RegisterAgentRequest, RelayCounters, UserRevocation, agent_report, control_update,
};
use rand::Rng;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tracing::{debug, info, warn};

use super::relay_loop::{AllocationInfo, Command, LoopChange};
use super::{Counters, Shared, State, lock};
use crate::config::{Config, ControlSettings};
use rampart_rate_limit::RateLimit;
use rampart_turn::Transport;
use rampart_turn::bandwidth::{BandwidthLimit, BandwidthPolicy};
use rampart_turn::server::MediaAuthorization;

/// First reconnection delay; doubled after every failed attempt up to [`BACKOFF_MAX`]. The
/// actual wait is uniformly drawn from the upper half of the current delay, so agents that
/// lost control together do not come back in lockstep.
const BACKOFF_MIN: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(15);
/// How long connecting and registering may take before the attempt counts as failed.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Used when control does not say how often to report.
const DEFAULT_REPORT_INTERVAL: Duration = Duration::from_secs(10);

/// What the agent holds from the control service (in the shell's state, under its lock).
#[derive(Debug, Default)]
pub(super) struct ControlState {
    /// The highest control revision applied.
    pub(super) revision: u64,
    /// Revocations already applied (user, revoked_at): a snapshot repeats every revocation
    /// still in force, and re-applying one would end allocations made since with fresh
    /// credentials.
    revocations: HashSet<(String, u64)>,
    /// The front-ends' media authorizations: (external user, internal user) -> expiry.
    media_authorizations: HashMap<(String, String), u64>,
    /// `[limits] bandwidth_per_allocation`: the default wherever the control plane's policy
    /// sets none.
    configured_bandwidth: Option<BandwidthLimit>,
}

impl ControlState {
    pub(super) fn new(configured_bandwidth: Option<BandwidthLimit>) -> Self {
        ControlState {
            configured_bandwidth,
            ..ControlState::default()
        }
    }
}

/// The registration this agent sends: its addresses and capacity, from the configuration.
pub(super) fn registration(config: &Config, agent_id: &str) -> RegisterAgentRequest {
    let mut addresses: Vec<AgentAddress> = Vec::new();
    let mut add = |role: AddressRole, ip: IpAddr| {
        if ip.is_unspecified() {
            return;
        }
        let ip = ip.to_string();
        if !addresses
            .iter()
            .any(|a| a.ip == ip && a.role == role as i32)
        {
            addresses.push(AgentAddress {
                role: role as i32,
                ip,
            });
        }
    };
    for relay in [config.turn.relay_v4, config.turn.relay_v6]
        .into_iter()
        .flatten()
    {
        add(AddressRole::External, relay.bind);
        if relay.advertised != relay.bind {
            add(AddressRole::Public, relay.advertised);
        }
    }
    for listener in &config.listeners {
        add(AddressRole::External, listener.address.ip());
    }
    RegisterAgentRequest {
        agent_id: agent_id.to_owned(),
        addresses,
        capacity: Some(AgentCapacity {
            max_allocations: u32::try_from(config.turn.allocations_total).unwrap_or(u32::MAX),
            relay_port_min: config.turn.port_range.0.into(),
            relay_port_max: config.turn.port_range.1.into(),
        }),
        software_version: env!("CARGO_PKG_VERSION").to_owned(),
    }
}

/// Wall-clock seconds, as the control plane's times are.
pub(super) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

/// Why one link session ended.
#[derive(Debug, thiserror::Error)]
enum LinkError {
    #[error("{0}")]
    Connect(#[from] control_link::client::ClientError),
    #[error("timed out connecting")]
    Timeout,
    #[error("{0}")]
    Rpc(#[from] tonic::Status),
    #[error("the control service closed the stream")]
    Closed,
}

/// The link task: runs until the edge shuts down.
pub(super) async fn run(
    shared: Arc<Shared>,
    settings: ControlSettings,
    registration: RegisterAgentRequest,
) {
    let endpoint = settings.link.endpoint();
    // The agent starts with no control state: its state is not current until a snapshot.
    let mut stale_since = Some(unix_now());
    let mut backoff = BACKOFF_MIN;
    let mut outage_logged = false;
    loop {
        let mut synced = false;
        let result = session(&shared, &settings, &registration, stale_since, &mut synced).await;
        let Err(error) = result;
        if synced {
            // The link was up and current: this is a new outage.
            stale_since = Some(unix_now());
            outage_logged = false;
            backoff = BACKOFF_MIN;
        }
        if outage_logged {
            debug!(%endpoint, %error, "control service still unreachable");
        } else {
            warn!(
                %endpoint,
                %error,
                "control service unreachable; serving with the last state received, reconnecting"
            );
            outage_logged = true;
        }
        let wait = rand::thread_rng().gen_range(backoff / 2..=backoff);
        tokio::time::sleep(wait).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// One connection: register, open Sync, apply updates and report until it breaks. Sets
/// `synced` once a snapshot has been applied.
async fn session(
    shared: &Arc<Shared>,
    settings: &ControlSettings,
    registration: &RegisterAgentRequest,
    stale_since: Option<u64>,
    synced: &mut bool,
) -> Result<std::convert::Infallible, LinkError> {
    let (mut client, report_interval) =
        tokio::time::timeout(CONNECT_TIMEOUT, connect(settings, registration))
            .await
            .map_err(|_| LinkError::Timeout)??;
    let (reports, outgoing) = mpsc::channel::<AgentReport>(8);
    let hello = AgentReport {
        report: Some(agent_report::Report::Hello(AgentHello {
            agent_id: settings.agent_id.clone(),
        })),
    };
    // The channel is fresh, so these cannot fail.
    let _ = reports.try_send(hello);
    let _ = reports.try_send(status(shared, stale_since).await);
    let mut updates = client
        .sync(ReceiverStream::new(outgoing))
        .await?
        .into_inner();
    info!(
        agent_id = settings.agent_id,
        report_interval = report_interval.as_secs(),
        "control link up"
    );
    let mut tick = tokio::time::interval(report_interval);
    tick.tick().await;
    let mut stale_since = stale_since;
    loop {
        tokio::select! {
            update = updates.message() => {
                let update = update?.ok_or(LinkError::Closed)?;
                let snapshot = matches!(update.update, Some(control_update::Update::Snapshot(_)));
                for change in apply(shared, update) {
                    shared.loops.broadcast(|| Command::Change(change.clone())).await;
                }
                if snapshot && !*synced {
                    *synced = true;
                    if let Some(since) = stale_since.take() {
                        info!(
                            stale_for = unix_now().saturating_sub(since),
                            "control state resynchronised"
                        );
                    }
                }
                // Say at once what was applied (and, after a snapshot, that the state is
                // current again): updates are rare, and operators watch the revision.
                if reports.send(status(shared, stale_since).await).await.is_err() {
                    return Err(LinkError::Closed);
                }
            }
            _ = tick.tick() => {
                if reports.send(status(shared, stale_since).await).await.is_err() {
                    return Err(LinkError::Closed);
                }
            }
        }
    }
}

async fn connect(
    settings: &ControlSettings,
    registration: &RegisterAgentRequest,
) -> Result<(RelayAgentClient<tonic::transport::Channel>, Duration), LinkError> {
    let channel = settings.link.connect().await?;
    let mut client = RelayAgentClient::new(channel);
    let response = client
        .register_agent(registration.clone())
        .await?
        .into_inner();
    let interval = match response.report_interval_seconds {
        0 => DEFAULT_REPORT_INTERVAL,
        seconds => Duration::from_secs(seconds.into()),
    };
    Ok((client, interval))
}

/// Apply one update to the shell's state, under its lock; returns what every relay loop is
/// to apply to its core.
fn apply(shared: &Shared, update: ControlUpdate) -> Vec<LoopChange> {
    let mut guard = shared.lock();
    let state = &mut *guard;
    let mut changes = Vec::new();
    match update.update {
        Some(control_update::Update::Snapshot(snapshot)) => {
            changes.extend(apply_policy(state, snapshot.policy.unwrap_or_default()));
            let gone = state
                .conferencing
                .replace_all(snapshot.conferences, unix_now());
            for conference in gone {
                disconnect(state, &conference);
            }
            info!(
                conferences = state.conferencing.conference_count(),
                revocations = snapshot.revocations.len(),
                revision = update.revision,
                "control snapshot applied"
            );
            // Forget revocations no longer in force, so the set stays bounded.
            let current: HashSet<(String, u64)> = snapshot
                .revocations
                .iter()
                .map(|r| (r.user.clone(), r.revoked_at_unix))
                .collect();
            for revocation in snapshot.revocations {
                changes.extend(revoke(state, revocation));
            }
            state
                .control
                .revocations
                .retain(|key| current.contains(key));
            state.control.media_authorizations = snapshot
                .media_authorizations
                .into_iter()
                .map(|a| ((a.external_user, a.internal_user), a.expires_at_unix))
                .collect();
            changes.push(media_authorizations(&state.control));
        }
        Some(control_update::Update::Policy(policy)) => changes.extend(apply_policy(state, policy)),
        Some(control_update::Update::ConferenceUpserted(conference)) => {
            debug!(
                conference = conference.conference_id,
                "conference key updated"
            );
            state.conferencing.upsert(conference);
        }
        Some(control_update::Update::ConferenceRemoved(removed)) => {
            info!(conference = removed.conference_id, "conference removed");
            if state
                .conferencing
                .remove(&removed.conference_id, unix_now())
            {
                disconnect(state, &removed.conference_id);
            }
            state.conference_sessions.remove(&removed.conference_id);
        }
        Some(control_update::Update::UserRevoked(revocation)) => {
            changes.extend(revoke(state, revocation));
        }
        Some(control_update::Update::MediaAuthorized(authorization)) => {
            info!(
                external = authorization.external_user,
                internal = authorization.internal_user,
                expires_at = authorization.expires_at_unix,
                "media session authorized"
            );
            // Expired ones go here, so the set stays as small as what is in force.
            let now = unix_now();
            state
                .control
                .media_authorizations
                .retain(|_, expires| *expires > now);
            state.control.media_authorizations.insert(
                (authorization.external_user, authorization.internal_user),
                authorization.expires_at_unix,
            );
            changes.push(media_authorizations(&state.control));
        }
        Some(control_update::Update::MediaAuthorizationRevoked(revoked)) => {
            info!(
                external = revoked.external_user,
                internal = revoked.internal_user,
                "media session authorization revoked"
            );
            state
                .control
                .media_authorizations
                .remove(&(revoked.external_user, revoked.internal_user));
            changes.push(media_authorizations(&state.control));
        }
        None => debug!(revision = update.revision, "empty control update ignored"),
    }
    state.control.revision = state.control.revision.max(update.revision);
    changes
}

/// Ends the sessions of a conference's participants (it was revoked).
fn disconnect(state: &mut State, conference_id: &str) {
    if let Some(token) = state.conference_sessions.remove(conference_id) {
        info!(
            conference = conference_id,
            "disconnecting the conference's participants"
        );
        token.cancel();
    }
}

fn apply_policy(state: &mut State, policy: AccessPolicy) -> [LoopChange; 2] {
    if let Some(edge) = &state.sip {
        edge.set_policy(sip_policy(edge.configured_policy(), &policy));
    }
    let networks: Vec<IpNet> = policy
        .internal_peer_networks
        .iter()
        .filter_map(|network| match network.parse() {
            Ok(network) => Some(network),
            Err(_) => {
                warn!(network, "control policy: not a CIDR network, ignored");
                None
            }
        })
        .collect();
    [
        LoopChange::AllowedPeerNetworks(networks),
        LoopChange::Bandwidth(bandwidth_policy(
            state.control.configured_bandwidth,
            policy.bandwidth,
        )),
    ]
}

/// The relay's bandwidth policy: the control plane's limits, over the configured default
/// where it sets none. Rates and bursts under the minimum (which control refuses) are raised.
fn bandwidth_policy(
    configured: Option<BandwidthLimit>,
    policy: Option<proto::control::v1::BandwidthPolicy>,
) -> BandwidthPolicy {
    let limit = |limit: Option<proto::control::v1::BandwidthLimit>| {
        let limit = limit.filter(|l| l.bits_per_second != 0)?;
        let bits_per_second = limit
            .bits_per_second
            .max(BandwidthLimit::MIN_BITS_PER_SECOND);
        Some(match limit.burst_bytes {
            0 => BandwidthLimit::with_default_burst(bits_per_second),
            burst => BandwidthLimit {
                bits_per_second,
                burst_bytes: burst.max(BandwidthLimit::MIN_BURST_BYTES),
            },
        })
    };
    let policy = policy.unwrap_or_default();
    BandwidthPolicy {
        default: match policy.allocation_default {
            None => configured,
            set => limit(set),
        },
        users: policy
            .users
            .into_iter()
            .map(|user| (user.user, limit(user.limit)))
            .collect(),
    }
}

/// The Access Edge's view of a control policy; the partner rate falls back to the agent's
/// configured one when the control plane leaves it unset.
fn sip_policy(
    configured: &rampart_sip::policy::AccessPolicy,
    policy: &AccessPolicy,
) -> rampart_sip::policy::AccessPolicy {
    let federation = policy.federation.clone().unwrap_or_default();
    let partner_rate = match federation.partner_requests_per_second {
        0 => configured.federation.partner_rate,
        rate => RateLimit {
            per_second: f64::from(rate),
            burst: f64::from(rate) * 5.0,
        },
    };
    rampart_sip::policy::AccessPolicy {
        remote_users: policy.remote_users_enabled,
        anonymous_users: policy.anonymous_users_enabled,
        federation: rampart_sip::policy::FederationPolicy {
            enabled: federation.enabled,
            allowed_domains: federation.allowed_domains.into_iter().collect(),
            blocked_domains: federation.blocked_domains.into_iter().collect(),
            partner_rate,
        },
    }
}

/// Every media authorization, for every loop (the loops drop expired ones themselves; so does
/// this set, when a snapshot replaces it).
fn media_authorizations(control: &ControlState) -> LoopChange {
    LoopChange::MediaAuthorizations(
        control
            .media_authorizations
            .iter()
            .map(|((external, internal), expires)| MediaAuthorization {
                external: external.clone(),
                internal: internal.clone(),
                expires_unix: *expires,
            })
            .collect(),
    )
}

/// The change a revocation makes, unless it was applied already.
fn revoke(state: &mut State, revocation: UserRevocation) -> Option<LoopChange> {
    let key = (revocation.user.clone(), revocation.revoked_at_unix);
    state
        .control
        .revocations
        .insert(key)
        .then_some(LoopChange::RevokeUser {
            user: revocation.user,
            through_unix: revocation.refuse_expiry_through_unix,
        })
}

/// Allocations listed per report at most; the rest are counted (AgentStatus).
const MAX_LISTED_ALLOCATIONS: usize = 5000;

async fn status(shared: &Shared, stale_since: Option<u64>) -> AgentReport {
    let reports = shared.loops.reports(MAX_LISTED_ALLOCATIONS).await;
    let counters = shared.counters(&reports);
    let (allocations, allocations_not_listed) = allocation_summaries(shared, reports);
    let (revision, conferences) = {
        let state = shared.lock();
        (
            state.control.revision,
            state.conferencing.conference_counters(),
        )
    };
    let health = match stale_since {
        Some(since) => AgentHealth {
            state: HealthState::Degraded as i32,
            problems: vec![format!(
                "stale: serving with control state from before {since} (Unix time) until resynchronised"
            )],
            stale_since_unix: since,
        },
        None => AgentHealth {
            state: HealthState::Ok as i32,
            problems: Vec::new(),
            stale_since_unix: 0,
        },
    };
    AgentReport {
        report: Some(agent_report::Report::Status(AgentStatus {
            applied_revision: revision,
            health: Some(health),
            counters: Some(relay_counters(&counters)),
            allocations,
            conferences,
            allocations_not_listed,
        })),
    }
}

/// The allocations for a status report (at most [`MAX_LISTED_ALLOCATIONS`]) and how many
/// were left out. Bytes, relayed and over the limit, are the userspace relay's plus the
/// kernel's for channels it forwards or forwarded.
fn allocation_summaries(
    shared: &Shared,
    reports: Vec<super::relay_loop::LoopReport>,
) -> (Vec<AllocationSummary>, u64) {
    let forwarded = lock(&shared.fast_path)
        .as_ref()
        .map(|fast_path| fast_path.kernel_traffic())
        .unwrap_or_default();
    let total: usize = reports.iter().map(|r| r.allocations).sum();
    let listed: Vec<_> = reports
        .into_iter()
        .flat_map(|report| report.listed)
        .take(MAX_LISTED_ALLOCATIONS)
        .map(|allocation: AllocationInfo| {
            let in_kernel = forwarded
                .get(&allocation.five_tuple)
                .copied()
                .unwrap_or_default();
            AllocationSummary {
                username: allocation.username.to_string(),
                user: allocation.user.to_string(),
                transport: match allocation.five_tuple.transport {
                    Transport::Udp => ClientTransport::Udp,
                    Transport::Tcp => ClientTransport::Tcp,
                    Transport::Tls => ClientTransport::Tls,
                } as i32,
                client_address: allocation.five_tuple.client.to_string(),
                relayed_address: allocation
                    .relayed
                    .map(|r| r.to_string())
                    .unwrap_or_default(),
                expires_at_unix: allocation.expires_at_unix,
                permissions: u32::try_from(allocation.permissions).unwrap_or(u32::MAX),
                channels: u32::try_from(allocation.channels).unwrap_or(u32::MAX),
                bytes_from_client: allocation.bytes_from_client + in_kernel.relayed.from_client,
                bytes_to_client: allocation.bytes_to_client + in_kernel.relayed.to_client,
                bandwidth_limit_bps: allocation.bandwidth_limit_bps,
                bytes_over_limit_from_client: allocation.over_limit.from_client
                    + in_kernel.over_limit.from_client,
                bytes_over_limit_to_client: allocation.over_limit.to_client
                    + in_kernel.over_limit.to_client,
            }
        })
        .collect();
    let not_listed = total.saturating_sub(listed.len()) as u64;
    (listed, not_listed)
}

fn relay_counters(counters: &Counters) -> RelayCounters {
    let relay = &counters.relay;
    let (mut fast_path_packets, mut fast_path_bytes) = (0, 0);
    for (name, packets, bytes) in &counters.xdp {
        if matches!(*name, "forwarded_to_peer" | "forwarded_to_client") {
            fast_path_packets += packets;
            fast_path_bytes += bytes;
        }
    }
    RelayCounters {
        active_allocations: counters.allocations as u64,
        allocations_total: relay.allocations_created,
        authentication_failures: relay.auth_failures,
        userspace_packets: relay.to_peer_packets + relay.to_client_packets,
        userspace_bytes: relay.to_peer_bytes + relay.to_client_bytes,
        fast_path_packets,
        fast_path_bytes,
        policy_drops: relay.forbidden_peers,
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::server::ShellStats;
    use rampart_turn::Stats;

    #[test]
    fn registration_names_relay_and_listener_addresses_once_each() {
        let config = Config::parse(
            r#"
realm = "example.org"
[[listen]]
transport = "udp"
address = "10.0.0.5:3478"
[[listen]]
transport = "tcp"
address = "0.0.0.0:443"
[relay]
ipv4 = "10.0.0.5"
behind_nat = true
public_ipv4 = "8.8.8.8"
port_min = 40000
port_max = 40999
[auth]
users = { alice = "pw" }
[limits]
allocations_total = 500
"#,
            Path::new("."),
        )
        .unwrap();
        let registration = registration(&config, "edge-1");
        assert_eq!(registration.agent_id, "edge-1");
        let addresses: Vec<(i32, &str)> = registration
            .addresses
            .iter()
            .map(|a| (a.role, a.ip.as_str()))
            .collect();
        assert_eq!(
            addresses,
            [
                (AddressRole::External as i32, "10.0.0.5"),
                (AddressRole::Public as i32, "8.8.8.8"),
            ]
        );
        assert_eq!(
            registration.capacity,
            Some(AgentCapacity {
                max_allocations: 500,
                relay_port_min: 40000,
                relay_port_max: 40999,
            })
        );
    }

    #[test]
    fn counters_map_onto_the_reported_relay_counters() {
        let counters = Counters {
            allocations: 3,
            relay: Stats {
                allocations_created: 7,
                auth_failures: 2,
                forbidden_peers: 4,
                to_peer_packets: 10,
                to_peer_bytes: 1000,
                to_client_packets: 5,
                to_client_bytes: 500,
                ..Stats::default()
            },
            shell: ShellStats::default(),
            fast_path: None,
            xdp: vec![
                ("seen", 100, 10_000),
                ("forwarded_to_peer", 20, 2000),
                ("forwarded_to_client", 30, 3000),
                ("pass_stun", 50, 5000),
            ],
            conferencing: None,
            sip: None,
        };
        assert_eq!(
            relay_counters(&counters),
            RelayCounters {
                active_allocations: 3,
                allocations_total: 7,
                authentication_failures: 2,
                userspace_packets: 15,
                userspace_bytes: 1500,
                fast_path_packets: 50,
                fast_path_bytes: 5000,
                policy_drops: 4,
            }
        );
    }
}
