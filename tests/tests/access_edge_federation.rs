//! Federation between two Access Edges on loopback: `corp.example` (whose policy comes from
//! the control service) and the partner `partner.example` (policy from its configuration).
//! Each edge's next hop is scripted. Calls go both ways through both edges over mutual TLS,
//! and switching federation off through the control API refuses the very next request.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use rampart_sip::uri::NameAddr;
use rampart_sip::{HeaderName, Message};
use rampart_tests::access_edge::{
    FakeDns, Federation, SipConnection, SipPki, Site, federation_policy, request, status,
};
use rampart_tests::control::temp_dir;
use rampart_tests::{Proto, Rampart, RampartConfig};

const CONVERGE: Duration = Duration::from_secs(25);
const TRUST_HEADER: &str = "X-Rampart-Origin";

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Sends a request and returns the final response.
fn exchange(connection: &mut SipConnection, message: &Message) -> Message {
    connection.send_message(message).unwrap();
    loop {
        let response = connection.recv().unwrap();
        if status(&response).is_some_and(|(code, _)| code >= 200) {
            return response;
        }
    }
}

fn wait_for_status(limit: Duration, what: &str, mut attempt: impl FnMut() -> u16, want: u16) {
    let start = Instant::now();
    loop {
        let got = attempt();
        if got == want {
            return;
        }
        assert!(
            start.elapsed() < limit,
            "{what}: still {got} after {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn calls_cross_both_edges_and_federation_follows_the_control_policy() {
    let rt = runtime();
    let dir = temp_dir().unwrap();
    let federation = Federation::new(dir.path()).unwrap();
    let (corp, partner) = (&federation.corp, &federation.partner);
    let mut edges = federation.start(dir.path(), &rt).unwrap();

    // A corp user calls a partner user: corp's front end -> corp edge -> partner edge ->
    // partner's front end. The control policy may take a moment to reach the agent.
    let mut inside = corp.internal_client().unwrap();
    let (bob, carol) = ("sip:bob@corp.example", "sip:carol@partner.example");
    let mut calls = 0;
    let mut invite = || {
        calls += 1;
        request("INVITE", carol, bob, carol, &format!("out-{calls}"), "")
    };
    wait_for_status(
        CONVERGE,
        "the policy reaches the corp edge",
        || status(&exchange(&mut inside, &invite())).unwrap().0,
        200,
    );
    let ok = exchange(&mut inside, &invite());
    let received = partner.next_hop.requests("INVITE");
    let at_partner = received.last().unwrap();
    assert_eq!(
        at_partner.header(&HeaderName::Other(TRUST_HEADER.into())),
        Some("federated;domain=corp.example")
    );
    let wire = String::from_utf8(at_partner.to_bytes()).unwrap();
    assert!(
        !wire.contains("corp.local"),
        "corp's internal names crossed to the partner:\n{wire}"
    );

    // The caller hangs up along the route set it learned.
    let mut routes: Vec<String> = ok
        .header_values(&HeaderName::RecordRoute)
        .map(str::to_owned)
        .collect();
    routes.reverse();
    let target = NameAddr::parse(ok.header(&HeaderName::Contact).unwrap())
        .unwrap()
        .uri
        .to_owned();
    let call_id = ok.header(&HeaderName::CallId).unwrap().to_owned();
    let route_lines: String = routes.iter().map(|r| format!("Route: {r}\r\n")).collect();
    let mut bye = request("BYE", &target, bob, carol, &call_id, &route_lines);
    bye.remove_headers(&HeaderName::CallId);
    bye.push_back(HeaderName::CallId, call_id.clone());
    assert_eq!(status(&exchange(&mut inside, &bye)), Some((200, "OK")));
    assert!(
        partner
            .next_hop
            .requests("BYE")
            .iter()
            .any(|m| m.header(&HeaderName::CallId) == Some(call_id.as_str()))
    );

    // A partner user calls into corp: partner's front end -> partner edge -> corp edge.
    let mut partner_inside = partner.internal_client().unwrap();
    let inbound = request("INVITE", bob, carol, bob, "in-1", "");
    assert_eq!(
        status(&exchange(&mut partner_inside, &inbound)),
        Some((200, "OK"))
    );
    let at_corp = corp.next_hop.requests("INVITE");
    assert_eq!(
        at_corp
            .last()
            .unwrap()
            .header(&HeaderName::Other(TRUST_HEADER.into())),
        Some("federated;domain=partner.example")
    );

    // Federation off through the control API: the next request is refused, both ways.
    rt.block_on(edges.front_end.set_access_policy(federation_policy(false)))
        .unwrap();
    wait_for_status(
        CONVERGE,
        "federation off reaches the corp edge",
        || status(&exchange(&mut inside, &invite())).unwrap().0,
        403,
    );
    let refused = exchange(&mut inside, &invite());
    assert_eq!(
        status(&refused),
        Some((403, "Forbidden: federation is disabled"))
    );
    let inbound = request("INVITE", bob, carol, bob, "in-2", "");
    assert_eq!(
        status(&exchange(&mut partner_inside, &inbound)),
        Some((403, "Forbidden: federation is disabled"))
    );
}

#[test]
fn partner_edges_are_found_by_dns_srv_and_must_prove_their_name() {
    let dir = temp_dir().unwrap();
    let public = SipPki::new(dir.path(), "public").unwrap();
    let mut corp = Site::new(dir.path(), "corp", "corp.example", &public).unwrap();
    let mut partner = Site::new(dir.path(), "partner", "partner.example", &public).unwrap();
    let partner_port = partner.section.external.port();
    // partner.example's SRV names its edge; impostor.example's points at the same edge, whose
    // certificate names neither sip.impostor.example nor impostor.example.
    let dns = FakeDns::start(
        vec![
            (
                "_sipfederationtls._tcp.partner.example".into(),
                10,
                1,
                partner_port,
                "sip.partner.example".into(),
            ),
            (
                "_sipfederationtls._tcp.impostor.example".into(),
                10,
                1,
                partner_port,
                "sip.impostor.example".into(),
            ),
        ],
        vec![
            ("sip.partner.example".into(), Ipv4Addr::LOCALHOST),
            ("sip.impostor.example".into(), Ipv4Addr::LOCALHOST),
        ],
    )
    .unwrap();
    corp.section.partner_ca = Some(public.ca_path());
    corp.section.dns_servers = vec![dns.address];
    corp.section.policy = vec![("federation".into(), "true".into())];
    partner.section.partner_ca = Some(public.ca_path());
    partner.section.policy = vec![("federation".into(), "true".into())];
    let _corp_edge = Rampart::start(
        &RampartConfig::single(Proto::Udp, false).with_section(corp.section.to_toml()),
    )
    .unwrap();
    let _partner_edge = Rampart::start(
        &RampartConfig::single(Proto::Udp, false).with_section(partner.section.to_toml()),
    )
    .unwrap();

    let mut inside = corp.internal_client().unwrap();
    let bob = "sip:bob@corp.example";
    let carol = "sip:carol@partner.example";
    let ok = exchange(
        &mut inside,
        &request("INVITE", carol, bob, carol, "srv-1", ""),
    );
    assert_eq!(status(&ok), Some((200, "OK")));
    assert_eq!(partner.next_hop.requests("INVITE").len(), 1);

    let mallory = "sip:mallory@impostor.example";
    let refused = exchange(
        &mut inside,
        &request("INVITE", mallory, bob, mallory, "srv-2", ""),
    );
    assert_eq!(
        status(&refused),
        Some((503, "Service Unavailable: partner edge unreachable"))
    );
    assert_eq!(
        partner.next_hop.requests("INVITE").len(),
        1,
        "nothing went to an edge that could not prove its name"
    );
}
