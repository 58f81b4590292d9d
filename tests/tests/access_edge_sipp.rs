//! The Access Edge with real SIP peers we did not write: sipp callers outside (or as a front
//! end inside) and a sipp UAS as the internal next hop. Debian's sipp has no TLS, so sipp's
//! TCP goes through TLS bridges (see `rampart_tests::sip`): what the edge sees is TLS.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rampart_tests::access_edge::{
    Federation, Leaf, SipConnection, SipPki, Site, federation_policy, request, status,
};
use rampart_tests::control::temp_dir;
use rampart_tests::sip::{Scenario, SippUac, SippUas};
use rampart_tests::{Proto, Rampart, RampartConfig};

const LEGIT: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1));
const FLOODER: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));

fn pem(leaf: &Leaf) -> (String, String) {
    (
        std::fs::read_to_string(&leaf.certificate).unwrap(),
        std::fs::read_to_string(&leaf.private_key).unwrap(),
    )
}

/// A sipp UAS standing in for `site`'s next hop (its certificate names the next hop host).
fn sipp_next_hop(site: &mut Site) -> SippUas {
    let host = format!("pool.{}.local", site.domain.split('.').next().unwrap());
    let (cert, key) = pem(&site.pki.issue("sipp-uas", &[&host]).unwrap());
    let uas = SippUas::start(LEGIT, &cert, &key).unwrap();
    site.section.next_hops = vec![(host, uas.addr())];
    uas
}

/// Whether the UAS's statistics (written once a second) come to show `calls` answered calls.
fn answered_eventually(uas: &SippUas, calls: u64) -> bool {
    let deadline = Instant::now() + Duration::from_secs(4);
    loop {
        let answered = uas
            .calls()
            .map(|stats| stats.successful)
            .unwrap_or_default();
        if answered >= calls {
            return true;
        }
        if Instant::now() > deadline {
            eprintln!("the UAS answered {answered} calls, not {calls}");
            return false;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn caller(site: &Site, public: &SipPki, scenario: Scenario) -> SippUac {
    SippUac::new(scenario, site.section.external, &public.ca_der())
        .server_name(&site.section.external_host)
        .domain(&site.domain)
        .from_domain(&site.domain)
}

#[test]
fn sipp_registers_and_calls_through_the_edge() {
    let dir = temp_dir().unwrap();
    let public = SipPki::new(dir.path(), "public").unwrap();
    let mut corp = Site::new(dir.path(), "corp", "corp.example", &public).unwrap();
    let uas = sipp_next_hop(&mut corp);
    let _edge = Rampart::start(
        &RampartConfig::single(Proto::Udp, false).with_section(corp.section.to_toml()),
    )
    .unwrap();

    let run = caller(&corp, &public, Scenario::Register)
        .calls(20)
        .rate(20.0)
        .run()
        .unwrap();
    run.assert_all_succeeded(20);
    let run = caller(&corp, &public, Scenario::Invite)
        .calls(50)
        .rate(25.0)
        .run()
        .unwrap();
    run.assert_all_succeeded(50);
    // Many callers, one connection each, all through the one connection to the next hop.
    let run = caller(&corp, &public, Scenario::Invite)
        .calls(30)
        .rate(30.0)
        .socket_per_call(true)
        .run()
        .unwrap();
    run.assert_all_succeeded(30);
    assert!(answered_eventually(&uas, 80), "{}", uas.diagnostics());
}

#[test]
fn sipp_calls_a_partner_through_both_edges_until_control_switches_federation_off() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = temp_dir().unwrap();
    let mut federation = Federation::new(dir.path()).unwrap();
    let partner_uas = sipp_next_hop(&mut federation.partner);
    let mut edges = federation.start(dir.path(), &rt).unwrap();
    let corp = &federation.corp;

    // sipp plays corp's front end: mutual TLS to the corp edge's internal port, calling
    // users of partner.example, whose edge hands the calls to its own next hop (sipp UAS).
    let (cert, key) = pem(&corp.front_end);
    let front_end_caller = || {
        SippUac::new(Scenario::Invite, corp.section.internal, &corp.pki.ca_der())
            .server_name(&corp.section.internal_host)
            .client_certificate(&cert, &key)
            .domain("partner.example")
            .from_domain("corp.example")
    };
    let wait_for_policy = Instant::now();
    let mut inside = corp.internal_client().unwrap();
    // The probe goes to a domain off the allow list: its refusal says whether federation is on.
    let probe = |inside: &mut SipConnection, n: u32| {
        let (bob, stranger) = ("sip:bob@corp.example", "sip:x@unlisted.example");
        inside
            .send_message(&request(
                "OPTIONS",
                stranger,
                bob,
                stranger,
                &format!("probe-{n}"),
                "",
            ))
            .unwrap();
        inside.recv().unwrap()
    };
    let mut n = 0;
    while status(&probe(&mut inside, n))
        != Some((403, "Forbidden: partner domain is not on the allow list"))
    {
        assert!(
            wait_for_policy.elapsed() < Duration::from_secs(25),
            "control's policy did not reach the edge"
        );
        std::thread::sleep(Duration::from_millis(200));
        n += 1;
    }
    let run = front_end_caller().calls(20).rate(20.0).run().unwrap();
    run.assert_all_succeeded(20);
    assert!(
        answered_eventually(&partner_uas, 20),
        "{}",
        partner_uas.diagnostics()
    );

    // Federation off through the control API: the next request is refused, with its reason.
    rt.block_on(edges.front_end.set_access_policy(federation_policy(false)))
        .unwrap();
    let switched = Instant::now();
    loop {
        n += 1;
        let answer = probe(&mut inside, n);
        if status(&answer) == Some((403, "Forbidden: federation is disabled")) {
            break;
        }
        assert!(
            switched.elapsed() < Duration::from_secs(25),
            "federation still on: {answer:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let refused = front_end_caller().calls(5).rate(10.0).run().unwrap();
    assert_eq!(
        (refused.calls.successful, refused.calls.failed),
        (0, 5),
        "{}",
        refused.diagnostics
    );
}

#[test]
fn a_flooding_source_is_cut_off_while_a_sipp_caller_elsewhere_completes_every_call() {
    let dir = temp_dir().unwrap();
    let public = SipPki::new(dir.path(), "public").unwrap();
    let mut corp = Site::new(dir.path(), "corp", "corp.example", &public).unwrap();
    corp.section.limits = vec![
        ("requests_per_second".into(), "40".into()),
        ("request_burst".into(), "80".into()),
        ("ban_after".into(), "50".into()),
        ("ban_seconds".into(), "30".into()),
    ];
    let _uas = sipp_next_hop(&mut corp);
    let edge = Rampart::start(
        &RampartConfig::single(Proto::Udp, false)
            .with_stats_interval(1)
            .with_section(corp.section.to_toml()),
    )
    .unwrap();

    // The flood: OPTIONS as fast as TLS takes them, reconnecting whenever cut off.
    let stop = Arc::new(AtomicBool::new(false));
    let cut_after_ms = Arc::new(AtomicU64::new(0));
    let refused_reconnects = Arc::new(AtomicU64::new(0));
    let flood = {
        let (stop, cut_after_ms, refused_reconnects) = (
            stop.clone(),
            cut_after_ms.clone(),
            refused_reconnects.clone(),
        );
        let (address, host, ca) = (
            corp.section.external,
            corp.section.external_host.clone(),
            public.ca_der(),
        );
        std::thread::spawn(move || {
            let started = Instant::now();
            let user = "sip:mallory@corp.example";
            let message =
                request("OPTIONS", "sip:bob@corp.example", user, user, "flood", "").to_bytes();
            while !stop.load(Ordering::Relaxed) && started.elapsed() < Duration::from_secs(60) {
                let Ok(mut connection) =
                    SipConnection::connect(address, Some(FLOODER), &host, ca.clone(), None)
                else {
                    refused_reconnects.fetch_add(1, Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                };
                while connection.send(&message).is_ok() && !stop.load(Ordering::Relaxed) {}
                if cut_after_ms.load(Ordering::Relaxed) == 0 {
                    cut_after_ms.store(started.elapsed().as_millis() as u64, Ordering::Relaxed);
                }
            }
        })
    };
    // Meanwhile a legitimate caller on another address: 60 calls over about 6 seconds.
    let run = caller(&corp, &public, Scenario::Invite)
        .source_ip(LEGIT)
        .calls(60)
        .rate(10.0)
        .run()
        .unwrap();
    stop.store(true, Ordering::Relaxed);
    flood.join().unwrap();
    run.assert_all_succeeded(60);
    let cut_after = Duration::from_millis(cut_after_ms.load(Ordering::Relaxed));
    assert!(
        !cut_after.is_zero() && cut_after < Duration::from_secs(5),
        "flood cut after {cut_after:?}"
    );
    assert!(
        refused_reconnects.load(Ordering::Relaxed) > 0,
        "a banned source cannot come back at once"
    );
    let counters = edge.counters();
    let sip = &counters.last().unwrap()["sip"];
    assert!(sip["dropped"]["banned_source"].as_u64() >= Some(1), "{sip}");
    assert!(
        sip["dropped"]["rate_limited"].as_u64() >= Some(49),
        "throttled before the ban: {sip}"
    );
    assert!(
        sip["dropped"]["connection_from_banned_source"].as_u64() >= Some(1),
        "{sip}"
    );
}
