//! The Access Edge's routing core: a stateless proxy (RFC 3261 section 16.11) fed parsed
//! messages and the time, answering with what to send where.
//!
//! - From outside, requests for the enterprise's domains go to the internal next hop, marked
//!   with a trust header saying whether a remote user, a federated partner or an anonymous
//!   guest sent them (a copy arriving from outside is removed first).
//! - From inside, requests for other domains go to the partner's edge when federation allows.
//! - The edge adds its Via and Record-Route (Path for REGISTER) so responses and in-dialog
//!   requests come back through it. What the edge must remember (which connection, which
//!   internal Vias, Record-Routes and Contacts it hid) travels sealed inside those headers
//!   ([`super::token`]), so the edge keeps no per-transaction state and the outside sees only
//!   the edge's own external name.

use std::collections::{BTreeMap, HashSet};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::message::{HeaderName, Message, StartLine, response_to, split_list};
use super::policy::{AccessPolicy, Federation};
use super::token::Sealer;
use super::uri::{NameAddr, SipUri};
use super::via::Via;

pub type ConnectionId = u64;

/// The header that tells the next hop how a request entered (never accepted from outside).
pub const TRUST_HEADER: &str = "X-Rampart-Origin";
/// The From domain of anonymous guests (RFC 3323 section 4.1.1.3).
pub const ANONYMOUS_DOMAIN: &str = "anonymous.invalid";
/// Prefix of the edge's own Via branches (RFC 3261's magic cookie first).
const BRANCH_PREFIX: &str = "z9hG4bK-rp-";
const ROUTE_PARAM: &str = "rampart";
const CONTACT_PARAM: &str = "rampart-contact";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Side {
    /// Internet: remote users, anonymous guests, partner edges.
    External,
    /// The next hop and other internal servers (mutual TLS).
    Internal,
}

/// Where a message came from.
#[derive(Clone, Debug)]
pub struct Origin<'a> {
    pub connection: ConnectionId,
    pub side: Side,
    /// On the external side, the DNS names of the peer's verified certificate: a partner
    /// edge. Empty for remote users and guests.
    pub partner_names: &'a [String],
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Destination {
    /// An existing connection; when it is gone and `partner` is set, a (new) connection to
    /// that partner domain's edge.
    Connection {
        id: ConnectionId,
        partner: Option<String>,
    },
    NextHop,
    /// The edge of a partner domain: a static route or DNS SRV, connection reused.
    Partner(String),
}

#[derive(Debug)]
pub enum Action {
    Forward {
        to: Destination,
        message: Message,
    },
    /// A response of the edge's own, to the connection the request came on.
    Respond(Message),
    Drop(&'static str),
}

/// How a request from outside entered, as the trust header says it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AccessMethod {
    RemoteUser,
    Anonymous,
    Federated(String),
}

impl AccessMethod {
    fn header_value(&self) -> String {
        match self {
            AccessMethod::RemoteUser => "remote-user".to_owned(),
            AccessMethod::Anonymous => "anonymous".to_owned(),
            AccessMethod::Federated(domain) => format!("federated;domain={domain}"),
        }
    }
}

#[derive(Clone, Debug)]
pub struct ProxySettings {
    /// The name the outside sees in the edge's Via, Record-Route and Contact.
    pub external_host: String,
    pub external_port: u16,
    /// The name the internal side sees (and reaches the edge by).
    pub internal_host: String,
    pub internal_port: u16,
    /// The enterprise's SIP domains, lower case.
    pub domains: HashSet<String>,
}

/// What the edge did, by kind; every refusal and drop has its own name.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct SipCounters {
    pub requests_forwarded: u64,
    pub responses_forwarded: u64,
    /// Requests answered by the edge itself, by reason.
    pub rejected: BTreeMap<&'static str, u64>,
    /// Messages and connections dropped without an answer, by reason.
    pub dropped: BTreeMap<&'static str, u64>,
}

impl SipCounters {
    pub fn drop(&mut self, reason: &'static str) {
        *self.dropped.entry(reason).or_default() += 1;
    }

    fn reject(&mut self, reason: &'static str) {
        *self.rejected.entry(reason).or_default() += 1;
    }
}

/// Sealed in the edge's Via branch: where the response goes, and the Vias hidden from the
/// outside.
#[derive(Serialize, Deserialize)]
struct ViaState {
    connection: ConnectionId,
    side: Side,
    /// The received top branch, so that each transaction gets its own branch.
    branch: String,
    hidden: Vec<String>,
    /// A REGISTER's own Contact URIs: its response may show them; any other binding it
    /// lists (registered from inside, say) is rewritten like every Contact leaving.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    own_contacts: Vec<String>,
}

/// Sealed in the edge's Record-Route and Path entries.
#[derive(Clone, Serialize, Deserialize)]
struct RouteState {
    /// The external connection in-dialog requests from inside are sent on.
    outside: Option<ConnectionId>,
    /// The partner domain of a federated dialog: reconnect there if that connection is gone.
    partner: Option<String>,
    /// Internal Record-Route entries hidden from the outside.
    hidden: Vec<String>,
}

pub struct Proxy {
    settings: ProxySettings,
    policy: AccessPolicy,
    federation: Federation,
    sealer: Sealer,
    pub counters: SipCounters,
}

/// A refusal: status, reason phrase (what the peer reads) and counter name.
type Refusal = (u16, &'static str, &'static str);
/// A refused request with its refusal (boxed: the error path must not bloat the result).
type Rejected = Box<(Message, Refusal)>;

fn reject(message: Message, refusal: Refusal) -> Rejected {
    Box::new((message, refusal))
}

impl Proxy {
    pub fn new(settings: ProxySettings, policy: AccessPolicy, sealer: Sealer) -> Proxy {
        Proxy {
            federation: Federation::new(policy.federation.clone()),
            settings,
            policy,
            sealer,
            counters: SipCounters::default(),
        }
    }

    pub fn set_policy(&mut self, policy: AccessPolicy) {
        self.federation.set_policy(policy.federation.clone());
        self.policy = policy;
    }

    pub fn policy(&self) -> &AccessPolicy {
        &self.policy
    }

    pub fn handle(&mut self, origin: &Origin, message: Message, now: Instant) -> Action {
        match message.start {
            StartLine::Response { .. } => self.response(origin, message),
            StartLine::Request { .. } => match self.request(origin, message, now) {
                Ok(action) => action,
                Err(rejected) => {
                    let (request, (status, reason, counter)) = *rejected;
                    self.counters.reject(counter);
                    if request.method() == Some("ACK") {
                        // ACK is never answered (RFC 3261 section 17.2.1).
                        return Action::Drop(counter);
                    }
                    let mut response = self.local_response(&request, status, reason);
                    if status == 420 {
                        for option in request.header_values(&HeaderName::ProxyRequire) {
                            response.push_back(
                                HeaderName::Other("Unsupported".to_owned()),
                                option.to_owned(),
                            );
                        }
                    }
                    Action::Respond(response)
                }
            },
        }
    }

    /// A request that did not parse but can still be answered.
    pub fn reject_unparsable(&mut self, error: &super::ParseError) -> Option<Message> {
        let request = error.request.as_ref()?;
        if request.method == "ACK" {
            return None;
        }
        self.counters.reject("malformed");
        let tag = self.sealer.short_tag(&request.call_id);
        Some(response_to(request, error.status, error.reason, &tag))
    }

    /// A forwarded request that could not be delivered (no next hop, partner unreachable,
    /// flow gone): the response the sender gets, and where it goes.
    pub fn undeliverable(
        &mut self,
        forwarded: &Message,
        status: u16,
        reason: &'static str,
    ) -> Option<Action> {
        let method = forwarded.method()?;
        self.counters.reject(match status {
            430 => "flow_failed",
            _ => "destination_unreachable",
        });
        if method == "ACK" {
            return None;
        }
        let identity = forwarded.identity()?;
        let tag = self.sealer.short_tag(&identity.call_id);
        let response = response_to(&identity, status, reason, &tag);
        // It travels back exactly like a response from the destination would.
        let origin = Origin {
            connection: ConnectionId::MAX,
            side: Side::Internal,
            partner_names: &[],
        };
        Some(self.response(&origin, response))
    }

    fn local_response(&self, request: &Message, status: u16, reason: &str) -> Message {
        let identity = request
            .identity()
            .expect("a parsed request has an identity");
        let tag = self.sealer.short_tag(&identity.call_id);
        response_to(&identity, status, reason, &tag)
    }

    fn response(&mut self, origin: &Origin, mut message: Message) -> Action {
        let Some(state) = message
            .header(&HeaderName::Via)
            .and_then(Via::parse)
            .and_then(|via| {
                via.branch()
                    .and_then(|b| b.strip_prefix(BRANCH_PREFIX))
                    .map(str::to_owned)
            })
            .and_then(|token| self.sealer.open::<ViaState>(&token))
        else {
            self.counters.drop("response_not_for_edge");
            return Action::Drop("response_not_for_edge");
        };
        message.pop_front(&HeaderName::Via);
        for via in state.hidden.iter().rev() {
            message.push_front(HeaderName::Via, via.clone());
        }
        match state.side {
            Side::External => {
                self.outward_record_route(&mut message, None);
                self.hide_outward(&mut message, &state.own_contacts);
            }
            Side::Internal => {
                message.remove_headers(&trust_header());
                let outside = (origin.side == Side::External).then_some(origin.connection);
                self.inward_record_route(&mut message, outside, None, false);
            }
        }
        self.counters.responses_forwarded += 1;
        Action::Forward {
            to: Destination::Connection {
                id: state.connection,
                partner: None,
            },
            message,
        }
    }

    fn request(
        &mut self,
        origin: &Origin,
        mut message: Message,
        now: Instant,
    ) -> Result<Action, Rejected> {
        let max_forwards = message
            .header(&HeaderName::MaxForwards)
            .and_then(|v| v.parse::<u8>().ok())
            .unwrap_or(70);
        if max_forwards == 0 {
            return Err(reject(message, (483, "Too Many Hops", "max_forwards")));
        }
        message.remove_headers(&HeaderName::MaxForwards);
        message.push_back(HeaderName::MaxForwards, (max_forwards - 1).to_string());
        // Only the edge says how a request entered.
        message.remove_headers(&trust_header());

        if message.header(&HeaderName::ProxyRequire).is_some() {
            // No extension is supported here (RFC 3261 section 16.3, step 4).
            return Err(reject(message, (420, "Bad Extension", "proxy_require")));
        }
        let route = match self.pop_own_route(&mut message) {
            Ok(route) => route,
            Err(refusal) => return Err(reject(message, refusal)),
        };
        if route.is_none()
            && message.method() == Some("OPTIONS")
            && self.addressed_to_edge(&message)
        {
            // A keep-alive or reachability probe of the edge itself.
            let response = self.local_response(&message, 200, "OK");
            return Ok(Action::Respond(response));
        }
        match origin.side {
            Side::External => self.entering(origin, message, route, now),
            Side::Internal => self.leaving(origin, message, route, now),
        }
    }

    fn entering(
        &mut self,
        origin: &Origin,
        mut message: Message,
        route: Option<RouteState>,
        now: Instant,
    ) -> Result<Action, Rejected> {
        let method = match self.access_method(origin, &message, now) {
            Ok(method) => method,
            Err(refusal) => return Err(reject(message, refusal)),
        };
        let in_dialog = route.is_some() | self.restore_contact_target(&mut message);
        if !in_dialog && request_domain(&message).is_none() {
            return Err(reject(
                message,
                (416, "Unsupported URI Scheme", "unsupported_uri"),
            ));
        }
        if !in_dialog && !self.for_enterprise(&message) {
            return Err(reject(
                message,
                (
                    403,
                    "Forbidden: not a domain of this enterprise",
                    "foreign_domain",
                ),
            ));
        }
        if let Some(route) = &route {
            for hidden in route.hidden.iter().rev() {
                message.push_front(HeaderName::Route, hidden.clone());
            }
        }
        message.push_back(
            HeaderName::Other(TRUST_HEADER.to_owned()),
            method.header_value(),
        );
        let partner = match &method {
            AccessMethod::Federated(domain) => Some(domain.clone()),
            _ => None,
        };
        if !in_dialog {
            if message.method() == Some("REGISTER") {
                let state = RouteState {
                    outside: Some(origin.connection),
                    partner: None,
                    hidden: Vec::new(),
                };
                let path = self.route_entry(Side::Internal, &state);
                message.push_front(HeaderName::Path, path);
            } else {
                self.inward_record_route(&mut message, Some(origin.connection), partner, true);
            }
        }
        let branch = top_branch(&message);
        let own_contacts = if message.method() == Some("REGISTER") {
            contact_uris(&message)
        } else {
            Vec::new()
        };
        let via = self.own_via(
            Side::Internal,
            &ViaState {
                connection: origin.connection,
                side: Side::External,
                branch,
                hidden: Vec::new(),
                own_contacts,
            },
        );
        message.push_front(HeaderName::Via, via);
        self.counters.requests_forwarded += 1;
        Ok(Action::Forward {
            to: Destination::NextHop,
            message,
        })
    }

    fn leaving(
        &mut self,
        origin: &Origin,
        mut message: Message,
        route: Option<RouteState>,
        now: Instant,
    ) -> Result<Action, Rejected> {
        let destination = match route {
            Some(RouteState {
                outside: Some(id),
                partner,
                ..
            }) => Destination::Connection { id, partner },
            Some(RouteState {
                outside: None,
                partner: Some(domain),
                ..
            }) => Destination::Partner(domain),
            Some(_) => {
                return Err(reject(
                    message,
                    (403, "Forbidden: no outside route", "route_without_flow"),
                ));
            }
            None => {
                let Some(domain) = request_domain(&message) else {
                    return Err(reject(
                        message,
                        (416, "Unsupported URI Scheme", "unsupported_uri"),
                    ));
                };
                if self.settings.domains.contains(&domain) {
                    return Err(reject(
                        message,
                        (
                            403,
                            "Forbidden: no outside route to an enterprise domain",
                            "internal_domain_from_inside",
                        ),
                    ));
                }
                if let Err(refusal) = self.federation.admit(&domain, now) {
                    let status = if refusal == super::policy::FederationRefusal::RateCapped {
                        503
                    } else {
                        403
                    };
                    return Err(reject(
                        message,
                        (status, refusal.reason_phrase(), refusal.counter()),
                    ));
                }
                Destination::Partner(domain)
            }
        };
        let initial = matches!(destination, Destination::Partner(_))
            && !message.headers.iter().any(|h| h.name == HeaderName::Route);
        // The internal Vias leave sealed in the edge's own.
        let hidden: Vec<String> = message
            .header_values(&HeaderName::Via)
            .map(str::to_owned)
            .collect();
        let branch = top_branch(&message);
        message.remove_headers(&HeaderName::Via);
        let via = self.own_via(
            Side::External,
            &ViaState {
                connection: origin.connection,
                side: Side::Internal,
                branch,
                hidden,
                own_contacts: Vec::new(),
            },
        );
        message.push_front(HeaderName::Via, via);
        let add_record_route = initial && message.method() != Some("REGISTER");
        let partner = match &destination {
            Destination::Partner(domain) => Some(domain.clone()),
            Destination::Connection { partner, .. } => partner.clone(),
            Destination::NextHop => None,
        };
        self.outward_record_route(&mut message, add_record_route.then_some(partner));
        self.hide_outward(&mut message, &[]);
        self.counters.requests_forwarded += 1;
        Ok(Action::Forward {
            to: destination,
            message,
        })
    }

    /// Who sent a request from outside, and whether the policy lets them in.
    fn access_method(
        &mut self,
        origin: &Origin,
        message: &Message,
        now: Instant,
    ) -> Result<AccessMethod, Refusal> {
        let from = message.header(&HeaderName::From).unwrap_or_default();
        let Some(from_domain) = NameAddr::parse(from)
            .and_then(|name_addr| SipUri::parse(name_addr.uri))
            .map(|uri| uri.domain().to_owned())
        else {
            return Err((403, "Forbidden: From must be a SIP URI", "from_not_sip"));
        };
        if !origin.partner_names.is_empty() {
            let named = origin.partner_names.iter().any(|name| {
                name.eq_ignore_ascii_case(&from_domain)
                    || name
                        .to_ascii_lowercase()
                        .ends_with(&format!(".{from_domain}"))
            });
            if !named {
                return Err((
                    403,
                    "Forbidden: partner certificate does not name the From domain",
                    "partner_certificate_mismatch",
                ));
            }
            if self.settings.domains.contains(&from_domain) {
                return Err((
                    403,
                    "Forbidden: partner claims an enterprise domain",
                    "partner_claims_enterprise_domain",
                ));
            }
            return match self.federation.admit(&from_domain, now) {
                Ok(()) => Ok(AccessMethod::Federated(from_domain)),
                Err(refusal) => {
                    let status = if refusal == super::policy::FederationRefusal::RateCapped {
                        503
                    } else {
                        403
                    };
                    Err((status, refusal.reason_phrase(), refusal.counter()))
                }
            };
        }
        if from_domain == ANONYMOUS_DOMAIN {
            return if self.policy.anonymous_users {
                Ok(AccessMethod::Anonymous)
            } else {
                Err((
                    403,
                    "Forbidden: anonymous access is disabled",
                    "anonymous_disabled",
                ))
            };
        }
        if self.settings.domains.contains(&from_domain) {
            return if self.policy.remote_users {
                Ok(AccessMethod::RemoteUser)
            } else {
                Err((
                    403,
                    "Forbidden: remote user access is disabled",
                    "remote_users_disabled",
                ))
            };
        }
        Err((
            403,
            "Forbidden: federation requires a partner certificate",
            "federation_without_certificate",
        ))
    }

    fn for_enterprise(&self, message: &Message) -> bool {
        request_domain(message).is_some_and(|domain| self.settings.domains.contains(&domain))
    }

    fn addressed_to_edge(&self, message: &Message) -> bool {
        let StartLine::Request { uri, .. } = &message.start else {
            return false;
        };
        SipUri::parse(uri).is_some_and(|uri| {
            uri.user.is_none()
                && (uri.domain() == self.settings.external_host
                    || uri.domain() == self.settings.internal_host)
        })
    }

    /// Pops a top Route that names the edge; its sealed state, or 403 for a forged one.
    fn pop_own_route(&mut self, message: &mut Message) -> Result<Option<RouteState>, Refusal> {
        let Some(top) = message.header(&HeaderName::Route) else {
            return Ok(None);
        };
        let Some(uri) = NameAddr::parse(top).and_then(|name_addr| SipUri::parse(name_addr.uri))
        else {
            return Ok(None);
        };
        let Some(Some(token)) = uri.param(ROUTE_PARAM) else {
            return Ok(None);
        };
        if uri.domain() != self.settings.external_host
            && uri.domain() != self.settings.internal_host
        {
            return Ok(None);
        }
        let Some(state) = self.sealer.open::<RouteState>(token) else {
            return Err((
                403,
                "Forbidden: route not issued by this edge",
                "forged_route",
            ));
        };
        message.pop_front(&HeaderName::Route);
        Ok(Some(state))
    }

    /// An in-dialog request from outside whose target is a Contact the edge rewrote: the
    /// internal Contact is put back. True if it was one.
    fn restore_contact_target(&self, message: &mut Message) -> bool {
        let StartLine::Request { uri, .. } = &mut message.start else {
            return false;
        };
        let original = SipUri::parse(uri)
            .filter(|parsed| parsed.domain() == self.settings.external_host)
            .and_then(|parsed| {
                parsed
                    .param(CONTACT_PARAM)
                    .flatten()
                    .and_then(|t| self.sealer.open::<String>(t))
            });
        match original {
            Some(original) => {
                *uri = original;
                true
            }
            None => false,
        }
    }

    fn own_via(&self, facing: Side, state: &ViaState) -> String {
        let (host, port) = self.facing(facing);
        format!(
            "SIP/2.0/TLS {host}:{port};branch={BRANCH_PREFIX}{}",
            self.sealer.seal(state)
        )
    }

    fn route_entry(&self, facing: Side, state: &RouteState) -> String {
        let (host, port) = self.facing(facing);
        format!(
            "<sip:{host}:{port};transport=tls;lr;{ROUTE_PARAM}={}>",
            self.sealer.seal(state)
        )
    }

    fn facing(&self, side: Side) -> (&str, u16) {
        match side {
            Side::External => (&self.settings.external_host, self.settings.external_port),
            Side::Internal => (&self.settings.internal_host, self.settings.internal_port),
        }
    }

    /// The position and state of the edge's own Record-Route entry as `facing` sees it.
    fn own_record_route(&self, message: &Message, facing: Side) -> Option<(usize, RouteState)> {
        let (host, _) = self.facing(facing);
        message
            .header_values(&HeaderName::RecordRoute)
            .enumerate()
            .find_map(|(index, value)| {
                let uri =
                    NameAddr::parse(value).and_then(|name_addr| SipUri::parse(name_addr.uri))?;
                if uri.domain() != host {
                    return None;
                }
                let state = self
                    .sealer
                    .open::<RouteState>(uri.param(ROUTE_PARAM).flatten()?)?;
                Some((index, state))
            })
    }

    /// A message leaving towards the outside: the internal Record-Route entries above the
    /// edge's own are sealed into its external one. `add` (with the partner, if any) puts an
    /// entry there when the edge has none yet (an initial request from inside).
    fn outward_record_route(&self, message: &mut Message, add: Option<Option<String>>) {
        let entries: Vec<String> = message
            .header_values(&HeaderName::RecordRoute)
            .map(str::to_owned)
            .collect();
        let (hidden, state, rest) = match self.own_record_route(message, Side::Internal) {
            Some((index, state)) => (
                entries[..index].to_vec(),
                state,
                entries[index + 1..].to_vec(),
            ),
            None => match add {
                Some(partner) => (
                    entries,
                    RouteState {
                        outside: None,
                        partner,
                        hidden: Vec::new(),
                    },
                    Vec::new(),
                ),
                // Nothing of the edge's: internal entries still must not leave.
                None if entries.is_empty() => return,
                None => (
                    entries,
                    RouteState {
                        outside: None,
                        partner: None,
                        hidden: Vec::new(),
                    },
                    Vec::new(),
                ),
            },
        };
        let entry = self.route_entry(Side::External, &RouteState { hidden, ..state });
        message.remove_headers(&HeaderName::RecordRoute);
        message.push_back(HeaderName::RecordRoute, entry);
        for value in rest {
            message.push_back(HeaderName::RecordRoute, value);
        }
    }

    /// A message entering from outside: the edge's external Record-Route entry becomes its
    /// internal one (naming the external connection) followed by the entries it hid; with
    /// `add`, an entry is put on top when there is none (an initial request from outside).
    fn inward_record_route(
        &self,
        message: &mut Message,
        outside: Option<ConnectionId>,
        partner: Option<String>,
        add: bool,
    ) {
        let mut entries: Vec<String> = message
            .header_values(&HeaderName::RecordRoute)
            .map(str::to_owned)
            .collect();
        match self.own_record_route(message, Side::External) {
            Some((index, state)) => {
                let own = self.route_entry(
                    Side::Internal,
                    &RouteState {
                        outside: outside.or(state.outside),
                        partner: partner.or(state.partner),
                        hidden: Vec::new(),
                    },
                );
                entries.splice(index..=index, std::iter::once(own).chain(state.hidden));
            }
            None if add => {
                let own = self.route_entry(
                    Side::Internal,
                    &RouteState {
                        outside,
                        partner,
                        hidden: Vec::new(),
                    },
                );
                entries.insert(0, own);
            }
            None => return,
        }
        message.remove_headers(&HeaderName::RecordRoute);
        let at = message
            .headers
            .iter()
            .position(|h| h.name == HeaderName::Via)
            .map_or(0, |at| at + 1);
        for (offset, value) in entries.into_iter().enumerate() {
            message.headers.insert(
                at + offset,
                super::message::Header {
                    name: HeaderName::RecordRoute,
                    value,
                },
            );
        }
    }

    /// What leaves towards the outside names no internal host: Contacts point at the edge
    /// (but for `keep`, the outside party's own bindings in a REGISTER response), and Server,
    /// Warning and the trust header are removed.
    fn hide_outward(&self, message: &mut Message, keep: &[String]) {
        for name in [
            HeaderName::Server,
            HeaderName::Other("Warning".to_owned()),
            trust_header(),
        ] {
            message.remove_headers(&name);
        }
        let (host, port) = self.facing(Side::External);
        for header in message
            .headers
            .iter_mut()
            .filter(|h| h.name == HeaderName::Contact)
        {
            let Ok(entries) = split_list(&header.value) else {
                continue;
            };
            let rewritten: Vec<String> = entries
                .iter()
                .map(|entry| match NameAddr::parse(entry) {
                    Some(name_addr)
                        if SipUri::parse(name_addr.uri).is_some()
                            && !keep.iter().any(|own| own == name_addr.uri) =>
                    {
                        let token = self.sealer.seal(&name_addr.uri);
                        name_addr.with_uri(&format!(
                            "sip:{host}:{port};transport=tls;{CONTACT_PARAM}={token}"
                        ))
                    }
                    _ => (*entry).to_owned(),
                })
                .collect();
            header.value = rewritten.join(", ");
        }
    }
}

/// The URIs of every Contact of a message.
fn contact_uris(message: &Message) -> Vec<String> {
    message
        .header_values(&HeaderName::Contact)
        .filter_map(|value| split_list(value).ok())
        .flatten()
        .filter_map(|entry| NameAddr::parse(entry).map(|name_addr| name_addr.uri.to_owned()))
        .collect()
}

fn trust_header() -> HeaderName {
    HeaderName::Other(TRUST_HEADER.to_owned())
}

fn top_branch(message: &Message) -> String {
    message
        .header(&HeaderName::Via)
        .and_then(Via::parse)
        .and_then(|via| via.branch().map(str::to_owned))
        .unwrap_or_default()
}

/// The domain of a sip:/sips: Request-URI, lower case.
fn request_domain(message: &Message) -> Option<String> {
    let StartLine::Request { uri, .. } = &message.start else {
        return None;
    };
    SipUri::parse(uri).map(|uri| uri.domain().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Limits;
    use crate::policy::FederationPolicy;

    const CLIENT: ConnectionId = 1;
    const NEXT_HOP: ConnectionId = 2;
    const PARTNER: ConnectionId = 3;

    fn proxy(policy: AccessPolicy) -> Proxy {
        Proxy::new(
            ProxySettings {
                external_host: "sip.corp.example".into(),
                external_port: 5061,
                internal_host: "edge-int.corp.local".into(),
                internal_port: 5061,
                domains: ["corp.example".to_owned()].into(),
            },
            policy,
            Sealer::random(),
        )
    }

    fn federating() -> AccessPolicy {
        let mut policy = AccessPolicy::default();
        policy.federation = FederationPolicy {
            enabled: true,
            allowed_domains: ["partner.example".to_owned()].into(),
            ..policy.federation
        };
        policy
    }

    fn outside() -> Origin<'static> {
        Origin {
            connection: CLIENT,
            side: Side::External,
            partner_names: &[],
        }
    }

    fn inside() -> Origin<'static> {
        Origin {
            connection: NEXT_HOP,
            side: Side::Internal,
            partner_names: &[],
        }
    }

    fn parse(text: &str) -> Message {
        Message::parse(text.replace('\n', "\r\n").as_bytes(), &Limits::default()).unwrap()
    }

    fn request(method: &str, uri: &str, from: &str, extra: &str) -> Message {
        parse(&format!(
            "{method} {uri} SIP/2.0\nVia: SIP/2.0/TLS 198.51.100.7:40000;branch=z9hG4bKc1\nMax-Forwards: 70\n\
             From: <{from}>;tag=f1\nTo: <{uri}>\nCall-ID: call-1\nCSeq: 1 {method}\n\
             Contact: <sip:u@198.51.100.7:40000;transport=tls>\n{extra}Content-Length: 0\n\n"
        ))
    }

    fn forwarded(action: Action) -> (Destination, Message) {
        match action {
            Action::Forward { to, message } => (to, message),
            other => panic!("not forwarded: {other:?}"),
        }
    }

    fn refused(action: Action) -> (u16, String) {
        match action {
            Action::Respond(Message {
                start: StartLine::Response { status, reason },
                ..
            }) => (status, reason),
            other => panic!("not refused: {other:?}"),
        }
    }

    /// The response a UAS at the end of `message` would send.
    fn answer(message: &Message, status: u16, extra: &str) -> Message {
        let mut text = format!("SIP/2.0 {status} OK\n");
        for via in message.header_values(&HeaderName::Via) {
            text.push_str(&format!("Via: {via}\n"));
        }
        for rr in message.header_values(&HeaderName::RecordRoute) {
            text.push_str(&format!("Record-Route: {rr}\n"));
        }
        for name in [HeaderName::From, HeaderName::CallId, HeaderName::CSeq] {
            text.push_str(&format!(
                "{}: {}\n",
                name.as_str(),
                message.header(&name).unwrap()
            ));
        }
        text.push_str(&format!(
            "To: {};tag=t1\n{extra}Content-Length: 0\n\n",
            message.header(&HeaderName::To).unwrap()
        ));
        parse(&text)
    }

    fn text(message: &Message) -> String {
        String::from_utf8(message.to_bytes()).unwrap()
    }

    #[test]
    fn remote_user_registers_through_the_edge() {
        let mut proxy = proxy(AccessPolicy::default());
        let now = Instant::now();
        let register = request(
            "REGISTER",
            "sip:corp.example",
            "sip:alice@corp.example",
            "X-Rampart-Origin: federated;domain=evil\n",
        );
        let (to, inward) = forwarded(proxy.handle(&outside(), register, now));
        assert_eq!(to, Destination::NextHop);
        assert_eq!(
            inward.header_values(&trust_header()).collect::<Vec<_>>(),
            ["remote-user"],
            "the forged copy is gone"
        );
        assert!(
            inward
                .header(&HeaderName::Path)
                .unwrap()
                .starts_with("<sip:edge-int.corp.local:5061;transport=tls;lr;rampart=")
        );
        assert!(
            inward
                .header(&HeaderName::Via)
                .unwrap()
                .starts_with("SIP/2.0/TLS edge-int.corp.local:5061;branch=z9hG4bK-rp-")
        );
        assert_eq!(inward.header(&HeaderName::MaxForwards), Some("69"));

        // The registrar lists the client's binding and one registered from inside.
        let ok = answer(
            &inward,
            200,
            "Server: FrontEnd/7.0 fe01.corp.local\nContact: <sip:u@198.51.100.7:40000;transport=tls>;expires=3600, <sip:alice@10.0.0.44:5061>;expires=300\n",
        );
        let (to, outward) = forwarded(proxy.handle(&inside(), ok, now));
        assert_eq!(
            to,
            Destination::Connection {
                id: CLIENT,
                partner: None
            }
        );
        assert_eq!(
            outward.header_values(&HeaderName::Via).collect::<Vec<_>>(),
            ["SIP/2.0/TLS 198.51.100.7:40000;branch=z9hG4bKc1"]
        );
        assert!(outward.header(&HeaderName::Server).is_none());
        let contacts = outward.header(&HeaderName::Contact).unwrap();
        assert!(
            contacts.starts_with(
                "<sip:u@198.51.100.7:40000;transport=tls>;expires=3600, <sip:sip.corp.example:5061"
            ),
            "{contacts}"
        );
        assert!(!contacts.contains("10.0.0.44"), "{contacts}");
    }

    #[test]
    fn a_dialog_from_outside_hides_the_internal_side_and_routes_in_dialog_requests() {
        let mut proxy = proxy(AccessPolicy::default());
        let now = Instant::now();
        let invite = request(
            "INVITE",
            "sip:bob@corp.example",
            "sip:alice@corp.example",
            "",
        );
        let (_, inward) = forwarded(proxy.handle(&outside(), invite, now));
        assert_eq!(inward.header_values(&HeaderName::RecordRoute).count(), 1);

        // The front end record-routes too and answers from an internal address.
        let mut at_front_end = inward.clone();
        at_front_end.push_front(
            HeaderName::RecordRoute,
            "<sip:fe01.corp.local:5061;transport=tls;lr>".into(),
        );
        at_front_end.push_front(
            HeaderName::Via,
            "SIP/2.0/TLS 10.0.0.9:5061;branch=z9hG4bKfe".into(),
        );
        let mut ok = answer(
            &at_front_end,
            200,
            "Contact: <sip:bob@10.0.0.21:5061;transport=tls>\nServer: FrontEnd fe01\n",
        );
        ok.pop_front(&HeaderName::Via); // the front end's own
        let (to, outward) = forwarded(proxy.handle(&inside(), ok, now));
        assert_eq!(
            to,
            Destination::Connection {
                id: CLIENT,
                partner: None
            }
        );
        let wire = text(&outward);
        for internal in ["10.0.0", "corp.local", "FrontEnd"] {
            assert!(!wire.contains(internal), "{internal} leaked in:\n{wire}");
        }
        let record_route = outward.header(&HeaderName::RecordRoute).unwrap().to_owned();
        let contact = NameAddr::parse(outward.header(&HeaderName::Contact).unwrap())
            .unwrap()
            .uri
            .to_owned();
        assert!(contact.starts_with("sip:sip.corp.example:5061;transport=tls;rampart-contact="));

        // The caller hangs up: Route from the Record-Route, target the rewritten Contact.
        let bye = request(
            "BYE",
            &contact,
            "sip:alice@corp.example",
            &format!("Route: {record_route}\n"),
        );
        let (to, inward_bye) = forwarded(proxy.handle(&outside(), bye, now));
        assert_eq!(to, Destination::NextHop);
        assert_eq!(
            inward_bye.start,
            StartLine::Request {
                method: "BYE".into(),
                uri: "sip:bob@10.0.0.21:5061;transport=tls".into()
            }
        );
        assert_eq!(
            inward_bye.header(&HeaderName::Route),
            Some("<sip:fe01.corp.local:5061;transport=tls;lr>")
        );
        assert_eq!(inward_bye.header(&trust_header()), Some("remote-user"));

        // Or the callee hangs up: the front end sends it to the edge's internal entry.
        let internal_entry = inward.header(&HeaderName::RecordRoute).unwrap();
        let bye = request(
            "BYE",
            "sip:u@198.51.100.7:40000;transport=tls",
            "sip:bob@corp.example",
            &format!("Route: {internal_entry}\n"),
        );
        let (to, outward_bye) = forwarded(proxy.handle(&inside(), bye, now));
        assert_eq!(
            to,
            Destination::Connection {
                id: CLIENT,
                partner: None
            }
        );
        assert_eq!(
            outward_bye.header_values(&HeaderName::Via).count(),
            1,
            "internal Vias hidden"
        );
        let response = answer(&outward_bye, 200, "");
        let (to, back) = forwarded(proxy.handle(&outside(), response, now));
        assert_eq!(
            to,
            Destination::Connection {
                id: NEXT_HOP,
                partner: None
            }
        );
        assert_eq!(
            back.header(&HeaderName::Via),
            Some("SIP/2.0/TLS 198.51.100.7:40000;branch=z9hG4bKc1"),
            "hidden Vias restored"
        );
    }

    #[test]
    fn access_methods_follow_the_policy_with_reasons() {
        let now = Instant::now();
        let mut proxy = proxy(AccessPolicy {
            remote_users: false,
            ..AccessPolicy::default()
        });
        let cases = [
            (
                "sip:alice@corp.example",
                "sip:bob@corp.example",
                "remote user access is disabled",
            ),
            (
                "sip:nobody@corp.example",
                "sip:bob@corp.example",
                "remote user access is disabled",
            ),
            (
                "sip:anonymous@anonymous.invalid",
                "sip:conf@corp.example",
                "anonymous access is disabled",
            ),
            (
                "sip:carol@partner.example",
                "sip:bob@corp.example",
                "federation requires a partner certificate",
            ),
        ];
        for (from, to, reason) in cases {
            let (status, phrase) =
                refused(proxy.handle(&outside(), request("INVITE", to, from, ""), now));
            assert_eq!(
                (status, phrase.as_str()),
                (403, format!("Forbidden: {reason}").as_str())
            );
        }
        proxy.set_policy(AccessPolicy {
            anonymous_users: true,
            ..AccessPolicy::default()
        });
        let guest = request(
            "INVITE",
            "sip:conf@corp.example",
            "sip:anonymous@anonymous.invalid",
            "",
        );
        let (_, inward) = forwarded(proxy.handle(&outside(), guest, now));
        assert_eq!(inward.header(&trust_header()), Some("anonymous"));
        let relay = request(
            "INVITE",
            "sip:x@elsewhere.example",
            "sip:alice@corp.example",
            "",
        );
        assert_eq!(
            refused(proxy.handle(&outside(), relay, now)).0,
            403,
            "not an open relay"
        );
        let hops = request(
            "OPTIONS",
            "sip:bob@corp.example",
            "sip:alice@corp.example",
            "",
        )
        .to_bytes();
        let hops = String::from_utf8(hops)
            .unwrap()
            .replace("Max-Forwards: 70", "Max-Forwards: 0");
        let hops = Message::parse(hops.as_bytes(), &Limits::default()).unwrap();
        assert_eq!(
            refused(proxy.handle(&outside(), hops, now)),
            (483, "Too Many Hops".into())
        );
        assert_eq!(
            proxy.counters.rejected.get("remote_users_disabled"),
            Some(&2)
        );
    }

    #[test]
    fn federation_both_ways() {
        let now = Instant::now();
        let mut proxy = proxy(federating());
        // Outbound: an internal user calls a partner.
        let invite = request(
            "INVITE",
            "sip:carol@partner.example",
            "sip:bob@corp.example",
            "Record-Route: <sip:fe01.corp.local;lr>\n",
        );
        let mut invite = invite;
        invite.push_front(
            HeaderName::Via,
            "SIP/2.0/TLS fe01.corp.local:5061;branch=z9hG4bKfe".into(),
        );
        let (to, outward) = forwarded(proxy.handle(&inside(), invite, now));
        assert_eq!(to, Destination::Partner("partner.example".into()));
        let wire = text(&outward);
        assert!(
            !wire.contains("fe01") && !wire.contains("198.51.100.7"),
            "{wire}"
        );
        let partner_origin = Origin {
            connection: PARTNER,
            side: Side::External,
            partner_names: &["sip.partner.example".to_owned()],
        };
        let (to, back) = forwarded(proxy.handle(&partner_origin, answer(&outward, 200, ""), now));
        assert_eq!(
            to,
            Destination::Connection {
                id: NEXT_HOP,
                partner: None
            }
        );
        assert_eq!(back.header_values(&HeaderName::Via).count(), 2);
        let routes: Vec<&str> = back.header_values(&HeaderName::RecordRoute).collect();
        assert_eq!(routes.len(), 2);
        assert!(routes[0].starts_with("<sip:edge-int.corp.local"));
        assert_eq!(routes[1], "<sip:fe01.corp.local;lr>");
        // The callee's BYE comes back from inside through the edge's internal entry.
        let bye = request(
            "BYE",
            "sip:carol@203.0.113.5",
            "sip:bob@corp.example",
            &format!("Route: {}\n", routes[0]),
        );
        let (to, _) = forwarded(proxy.handle(&inside(), bye, now));
        assert_eq!(
            to,
            Destination::Connection {
                id: PARTNER,
                partner: Some("partner.example".into())
            }
        );

        // Inbound from the partner: its certificate must name the From domain.
        let invite = request(
            "INVITE",
            "sip:bob@corp.example",
            "sip:carol@partner.example",
            "",
        );
        let (_, inward) = forwarded(proxy.handle(&partner_origin, invite.clone(), now));
        assert_eq!(
            inward.header(&trust_header()),
            Some("federated;domain=partner.example")
        );
        let liar = Origin {
            partner_names: &["sip.other.example".to_owned()],
            ..partner_origin.clone()
        };
        assert_eq!(refused(proxy.handle(&liar, invite.clone(), now)).0, 403);

        // Federation off: the next request is refused, both ways.
        let mut off = federating();
        off.federation.enabled = false;
        proxy.set_policy(off);
        assert_eq!(
            refused(proxy.handle(&partner_origin, invite, now)),
            (403, "Forbidden: federation is disabled".into())
        );
        let invite = request(
            "INVITE",
            "sip:carol@partner.example",
            "sip:bob@corp.example",
            "",
        );
        assert_eq!(refused(proxy.handle(&inside(), invite, now)).0, 403);
    }

    #[test]
    fn forged_routes_and_stray_responses_go_nowhere() {
        let now = Instant::now();
        let mut proxy = proxy(AccessPolicy::default());
        let forged = request(
            "BYE",
            "sip:bob@corp.example",
            "sip:alice@corp.example",
            "Route: <sip:sip.corp.example;lr;rampart=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA>\n",
        );
        assert_eq!(refused(proxy.handle(&outside(), forged, now)).0, 403);
        let stray = answer(
            &request(
                "INVITE",
                "sip:bob@corp.example",
                "sip:alice@corp.example",
                "",
            ),
            200,
            "",
        );
        assert!(matches!(
            proxy.handle(&inside(), stray, now),
            Action::Drop("response_not_for_edge")
        ));
        let (_, inward) = forwarded(proxy.handle(
            &outside(),
            request(
                "INVITE",
                "sip:bob@corp.example",
                "sip:alice@corp.example",
                "",
            ),
            now,
        ));
        let Some(Action::Forward { to, message }) =
            proxy.undeliverable(&inward, 503, "Service Unavailable")
        else {
            panic!("no 503");
        };
        assert_eq!(
            to,
            Destination::Connection {
                id: CLIENT,
                partner: None
            }
        );
        assert!(matches!(
            message.start,
            StartLine::Response { status: 503, .. }
        ));
    }
}
