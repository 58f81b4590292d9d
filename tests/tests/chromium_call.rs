//! Internal-party consent as a browser meets it: a WebRTC call between two headless Chromium
//! browsers through the edge (`rampart_tests::topology`), in `party` mode, with the XDP fast
//! path.
//!
//! The external browser (client namespace) offers with relay candidates only, through the
//! edge's external listener. The internal browser (peer namespace) answers with no ICE server,
//! so with host candidates only and no allocation: its address is nobody's party until it says
//! so. The only candidate pair is then the external relay address to the internal host, which
//! the edge holds (a relay candidate on the internal side would make a relay-to-relay pair,
//! which needs no consent and would connect regardless):
//!
//! - without an internal party the call does not connect: the edge logs the permission held
//!   and drops the connectivity checks;
//! - once the internal browser allocates on the edge's internal listener (a second connection
//!   whose description goes nowhere), the held permission is released with no new request from
//!   the external browser, the call connects, a data-channel message goes out and back, and
//!   the channel's datagrams go through the kernel.
//!
//! Both cases in one test, without a party first: consent is keyed on the internal address,
//! so a party's allocation left over would consent for the later call (closing a connection
//! deallocates; a browser closed with its connections open leaves their allocations behind for
//! their lifetime, 10 minutes).
//!
//! Needs root (namespaces, XDP): skipped with a message without it, except under CI. Needs
//! Debian's chromium (`cargo xtask setup`): fails without it.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use rampart_tests::chromium::Chromium;
use rampart_tests::media::{COUNTERS_WAIT, kernel_flow, number, xdp_delta};
use rampart_tests::tools;
use rampart_tests::topology::{EdgeTopology, SenderChecksums};
use rampart_tests::{PASSWORD, Proto, Rampart, USER};
use serde_json::{Value, json};

/// The page code: a global `call` with the steps below.
const CALL_JS: &str = include_str!("../src/chromium_call.js");
/// The agent's log lines (relay-user/turn/src/consent.rs).
const HELD: &str = "permission held until an internal party agrees";
const RELEASED: &str = "consent given, permission released";

/// Gathering of either side: host candidates at once, a relay candidate once the allocation
/// is made (about 150 ms measured).
const GATHERING: Duration = Duration::from_secs(10);
/// For the agent to log the permission held once the answer is accepted (20 ms measured).
const HOLD_WAIT: Duration = Duration::from_secs(3);
/// How long the call without a party must stay unconnected: far beyond the tens of
/// milliseconds a call takes to connect once consent is there, and short of the 15 s after
/// which Chromium gives up on the held pair (measured; then the call fails for good).
const NO_CONNECT_WINDOW: Duration = Duration::from_secs(8);
/// For the party's allocation (60 ms measured).
const PARTY_WAIT: Duration = Duration::from_secs(5);
/// For the call to connect once the party exists (30 to 100 ms measured).
const CONNECT_WAIT: Duration = Duration::from_secs(10);
/// For the data-channel message to go out and back.
const ROUND_TRIP_WAIT: Duration = Duration::from_secs(5);
/// For page calls that wait on nothing.
const AT_ONCE: Duration = Duration::from_secs(5);
/// What the test waits beyond a page's own bound: the page's timeout says more.
const SLACK: Duration = Duration::from_secs(3);

/// The two browsers, each with the page code installed.
struct Call {
    external: Chromium,
    internal: Chromium,
}

impl Call {
    fn start(binary: &Path, topology: &EdgeTopology) -> anyhow::Result<Call> {
        let mut external = Chromium::start(binary, topology.client.name(), "external")?;
        let mut internal = Chromium::start(binary, topology.peer.name(), "internal")?;
        for browser in [&mut external, &mut internal] {
            browser.evaluate(CALL_JS, AT_ONCE)?;
        }
        Ok(Call { external, internal })
    }

    /// Every candidate pair of both pages, for a failure message.
    fn pairs(&mut self) -> String {
        [
            ("external", &mut self.external),
            ("internal", &mut self.internal),
        ]
        .into_iter()
        .map(
            |(name, browser)| match browser.evaluate("call.pairs()", AT_ONCE) {
                Ok(pairs) => format!("{name} candidate pairs: {pairs}"),
                Err(e) => format!("{name} candidate pairs: {e:#}"),
            },
        )
        .collect::<Vec<_>>()
        .join("\n")
    }
}

/// `call.<step>(args..., limit in ms)` in a page, waited for a little beyond that limit.
fn bounded(
    browser: &mut Chromium,
    step: &str,
    args: &[Value],
    limit: Duration,
) -> anyhow::Result<Value> {
    let mut all: Vec<String> = args.iter().map(Value::to_string).collect();
    all.push(limit.as_millis().to_string());
    browser.evaluate(&format!("call.{step}({})", all.join(", ")), limit + SLACK)
}

/// An `iceServers` entry for a UDP listener of the edge, with the static user.
fn turn_server(listener: SocketAddr) -> Value {
    json!({
        "url": format!("turn:{listener}?transport=udp"),
        "username": USER,
        "credential": PASSWORD,
    })
}

/// Whether `sdp` has a UDP host candidate on `ip`
/// (`a=candidate:<foundation> <component> <transport> <priority> <address> <port> typ <type>`).
fn has_host_candidate(sdp: &str, ip: IpAddr) -> bool {
    let ip = ip.to_string();
    sdp.lines()
        .filter_map(|line| line.strip_prefix("a=candidate:"))
        .any(|candidate| {
            let fields: Vec<&str> = candidate.split_whitespace().collect();
            matches!(
                fields.as_slice(),
                [_, _, transport, _, address, _, "typ", "host", ..]
                    if transport.eq_ignore_ascii_case("udp") && *address == ip
            )
        })
}

/// Offer from the external page, answer from the internal one, and the answer back to the
/// external page: the call's ICE starts. Fails unless the answer offers the internal host.
fn signal(call: &mut Call, external_turn: &Value, internal_host: IpAddr) -> anyhow::Result<()> {
    let offer = bounded(
        &mut call.external,
        "offer",
        std::slice::from_ref(external_turn),
        GATHERING,
    )?;
    let offer = offer.as_str().context("the offer is not an SDP text")?;
    let answer = bounded(&mut call.internal, "answer", &[offer.into()], GATHERING)?;
    let answer = answer.as_str().context("the answer is not an SDP text")?;
    ensure!(
        has_host_candidate(answer, internal_host),
        "the internal page's answer has no UDP host candidate on {internal_host}: the media \
         permission grant did not take effect (without it Chromium offers no host candidate \
         in a namespace without a default route)\n{answer}"
    );
    call.external
        .evaluate(&format!("call.accept({})", Value::from(answer)), AT_ONCE)?;
    Ok(())
}

fn occurrences(server: &Rampart, message: &str) -> usize {
    server.log().matches(message).count()
}

/// Waits until the agent has logged `message` more than `before` times.
fn logged(server: &Rampart, message: &str, before: usize, limit: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    while occurrences(server, message) <= before {
        if Instant::now() >= deadline {
            bail!("the agent did not log `{message}` within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// The agent's latest `counters` line once `holds` is true of it (a line comes every second
/// while something changes).
fn counters_showing(
    server: &Rampart,
    what: &str,
    holds: impl Fn(&Value) -> bool,
) -> anyhow::Result<Value> {
    let deadline = Instant::now() + COUNTERS_WAIT;
    loop {
        let latest = server.counters().pop();
        if let Some(line) = &latest
            && holds(line)
        {
            return Ok(line.clone());
        }
        if Instant::now() >= deadline {
            bail!(
                "no counters line shows {what} within {COUNTERS_WAIT:?}; the latest: {}",
                latest.map_or_else(|| "none".to_owned(), |line| line.to_string())
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The call without an internal party: held, and not connected after [`NO_CONNECT_WINDOW`].
fn without_a_party(
    call: &mut Call,
    server: &Rampart,
    external_turn: &Value,
    internal_host: IpAddr,
) -> anyhow::Result<()> {
    let held_before = occurrences(server, HELD);
    signal(call, external_turn, internal_host)?;
    logged(server, HELD, held_before, HOLD_WAIT)?;
    let outcome = bounded(&mut call.external, "connected", &[], NO_CONNECT_WINDOW)?;
    ensure!(
        outcome["connected"] == false,
        "the call connected with no internal party: {outcome}"
    );
    let counters = counters_showing(server, "held checks dropped", |c| {
        number(c, &["relay", "consent_held_dropped"]) > 0
    })?;
    ensure!(
        number(&counters, &["relay", "consent_granted"]) == 0 && occurrences(server, RELEASED) == 0,
        "consent was given with no internal party: {}",
        counters["relay"]
    );
    // Closing deallocates: nothing of this call is left for the party to release later.
    for browser in [&mut call.external, &mut call.internal] {
        browser.evaluate("call.close()", AT_ONCE)?;
    }
    Ok(())
}

/// A new call, held until the internal page becomes a party; then connected, a message out and
/// back over the relay-to-host pair, the channel in the kernel.
fn with_a_party(
    call: &mut Call,
    server: &Rampart,
    external_turn: &Value,
    internal_turn: &Value,
    internal_host: IpAddr,
) -> anyhow::Result<()> {
    let held_before = occurrences(server, HELD);
    signal(call, external_turn, internal_host)?;
    logged(server, HELD, held_before, HOLD_WAIT)?;
    let state = call.external.evaluate("call.pc.connectionState", AT_ONCE)?;
    ensure!(
        state != "connected",
        "the call connected before the internal page became a party"
    );
    // Cumulative counters: any line before the party is a baseline for what the kernel
    // forwards after it (a held permission's datagrams never reach the kernel).
    let before = server.counters().pop().unwrap_or(Value::Null);
    let party = bounded(
        &mut call.internal,
        "party",
        std::slice::from_ref(internal_turn),
        PARTY_WAIT,
    )?;
    let outcome = bounded(&mut call.external, "connected", &[], CONNECT_WAIT)?;
    ensure!(
        outcome["connected"] == true,
        "the call did not connect once the internal page was a party ({party}): {outcome}"
    );
    logged(server, RELEASED, 0, HOLD_WAIT)?;
    bounded(&mut call.external, "roundTrip", &[], ROUND_TRIP_WAIT)?;
    let pair = call.external.evaluate("call.selectedPair()", AT_ONCE)?;
    ensure!(
        pair["local"]["type"] == "relay"
            && pair["local"]["relayProtocol"] == "udp"
            && pair["remote"]["type"] == "host"
            && pair["remote"]["address"] == internal_host.to_string(),
        "the call is not on the external relay address to the internal host: {pair}"
    );
    counters_showing(
        server,
        "consent given and the call's channel forwarded both ways in the kernel",
        |c| {
            let kernel = kernel_flow(&xdp_delta(&before, c));
            number(c, &["relay", "consent_granted"]) >= 1
                && number(c, &["fast_path", "channels_installed"]) >= 1
                && kernel.to_peer.packets > 0
                && kernel.to_client.packets > 0
        },
    )?;
    eprintln!(
        "chromium_call: connected {} ms after the party's allocation",
        outcome["ms"]
    );
    Ok(())
}

#[test]
fn a_browser_call_to_an_internal_host_connects_only_once_an_internal_party_allocates() {
    let Some(topology) = EdgeTopology::create("chromium_call", SenderChecksums::Complete)
        .expect("build the topology")
    else {
        return;
    };
    let binary = tools::require("chromium", "Debian's chromium");
    let internal_ip = topology.edge_internal_ip(false);
    let mut config = topology.agent_config("native").with_consent("party");
    config.listeners.push((Proto::Udp, internal_ip));
    config.internal_listeners = vec![(Proto::Udp, internal_ip)];
    let server = Rampart::start(&config).expect("start rampart in the edge namespace");
    let external_turn = turn_server(server.addr(Proto::Udp, topology.edge_external_ip(false)));
    let internal_turn = turn_server(server.addr(Proto::Udp, internal_ip));
    let internal_host = topology.peer_ip(false);
    // Dropped before the agent and the namespaces (locals drop in reverse order).
    let mut call = Call::start(&binary, &topology).expect("start the two browsers");
    let outcome = without_a_party(&mut call, &server, &external_turn, internal_host)
        .context("the call without an internal party")
        .and_then(|()| {
            with_a_party(
                &mut call,
                &server,
                &external_turn,
                &internal_turn,
                internal_host,
            )
            .context("the call with an internal party")
        });
    if let Err(e) = outcome {
        panic!("{e:#}\n{}\n{}", call.pairs(), topology.diagnostics());
    }
}
