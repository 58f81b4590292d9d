//! What `cargo xtask run` starts, driven the way the README tells a user to: the control
//! service and the agent linked over mutual TLS, the command-line client `rampart-control
//! call` for front-end and operator calls, and coturn's TURN client (which we did not write)
//! allocating with the media credentials a front-end obtained.
//!
//! Runs `xtask run --no-build` (with `rampart` and `rampart-control` as `cargo test
//! --workspace` built them) on the fixed ports of the all-in-one: 127.0.0.1:7443 (control)
//! and 127.0.0.1:3478 (TURN).

use std::net::{IpAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use rampart_tests::client::TurnClient;
use rampart_tests::control::temp_dir;
use rampart_tests::coturn::{EchoPeer, MESSAGES, assert_all_echoed, run_uclient};
use rampart_tests::tools::{Finished, die_with_parent, run_bounded};
use rampart_tests::{PEER_V4, Proto};
use serde_json::Value;

const CONVERGE: Duration = Duration::from_secs(30);

/// `rampart-control` next to `rampart` in the target directory.
fn sibling(name: &str) -> PathBuf {
    let path = rampart_tests::process::binary().with_file_name(name);
    assert!(
        path.is_file(),
        "{} is missing: `cargo test --workspace` builds it (or `cargo build --workspace`)",
        path.display()
    );
    path
}

/// The running all-in-one; stopped (SIGKILL) on drop if the test did not stop it, its log
/// printed for a failing test.
struct AllInOne {
    child: Child,
    log: PathBuf,
}

impl AllInOne {
    fn start(certs: &Path) -> AllInOne {
        let log = certs.with_extension("log");
        let file = std::fs::File::create(&log).unwrap();
        let child = die_with_parent(
            Command::new(env!("CARGO_BIN_EXE_xtask"))
                .args(["run", "--no-build", "--certs"])
                .arg(certs)
                .stdin(Stdio::null())
                .stdout(file.try_clone().unwrap())
                .stderr(file),
        )
        .spawn()
        .expect("start xtask run");
        AllInOne { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for AllInOne {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- xtask run log ---\n{}", self.log());
        }
    }
}

/// `rampart-control call -c <client file> <rpc> <json>`.
fn call(client: &Path, rpc: &str, request: &str) -> Finished {
    run_bounded(
        Command::new(sibling("rampart-control"))
            .args(["call", "-c"])
            .arg(client)
            .args([rpc, request]),
        Duration::from_secs(20),
    )
    .unwrap()
}

fn json_of(run: &Finished) -> Value {
    assert!(run.status.success(), "{}", run.output());
    serde_json::from_str(&run.stdout).unwrap_or_else(|e| panic!("{e}: {}", run.output()))
}

#[test]
fn all_in_one_runs_with_mutual_tls_and_the_cli_drives_it() {
    let dir = temp_dir().unwrap();
    let certs = dir.path().join("dev-certs");
    let mut edge = AllInOne::start(&certs);
    let operator = certs.join("operator-client.toml");
    let front_end = certs.join("front-end-client.toml");

    // The agent registers and its sync stream comes up without anyone doing anything.
    let started = Instant::now();
    let agent = loop {
        if operator.exists() {
            let run = call(&operator, "Operator/ListAgents", "{}");
            if run.status.success() {
                let agents = json_of(&run);
                if let Some(agent) = agents["agents"]
                    .as_array()
                    .and_then(|a| a.first())
                    .filter(|a| a["connected"] == true)
                {
                    break agent.clone();
                }
            }
        }
        assert!(
            started.elapsed() < CONVERGE,
            "no connected agent within {CONVERGE:?}\n{}",
            edge.log()
        );
        std::thread::sleep(Duration::from_millis(300));
    };
    assert_eq!(agent["registration"]["agentId"], "edge-1");
    assert_eq!(
        agent["registration"]["certificateIdentity"],
        "dns:edge-1.agents.rampart.test"
    );
    assert_eq!(agent["health"]["state"], "HEALTH_STATE_OK");

    // A front-end's media credentials, used by coturn's client on the agent.
    let credentials = json_of(&call(
        &front_end,
        "issue-media-credentials",
        r#"{"user": "alice@example.com"}"#,
    ));
    let username = credentials["username"].as_str().unwrap();
    let password = credentials["password"].as_str().unwrap();
    assert!(username.ends_with(":alice@example.com"), "{credentials}");
    assert!(
        credentials["turnUris"]
            .as_array()
            .unwrap()
            .contains(&Value::from("turn:localhost:3478?transport=udp")),
        "{credentials}"
    );
    let peer = EchoPeer::start(IpAddr::V4(PEER_V4));
    let run = run_uclient(&[
        "-u",
        username,
        "-w",
        password,
        "-c",
        "-n",
        &MESSAGES.to_string(),
        "-e",
        &peer.addr.ip().to_string(),
        "-r",
        &peer.addr.port().to_string(),
        "-p",
        "3478",
        "127.0.0.1",
    ]);
    assert_all_echoed(&run, MESSAGES);

    // An operator sees a live allocation, with what it relayed, in the agent's next report.
    let credentials = json_of(&call(
        &front_end,
        "IssueMediaCredentials",
        r#"{"user": "bob"}"#,
    ));
    let mut client =
        TurnClient::connect(Proto::Udp, "127.0.0.1:3478".parse().unwrap(), None).unwrap();
    client
        .allocate_with(
            credentials["username"].as_str().unwrap(),
            credentials["password"].as_str().unwrap(),
            &[],
        )
        .unwrap();
    client.create_permission(&[peer.addr]).unwrap();
    for _ in 0..3 {
        client.send_indication(peer.addr, &[7; 100]).unwrap();
        client.expect_recv().unwrap();
    }
    let started = Instant::now();
    let listed = loop {
        let listed = json_of(&call(&operator, "ListAllocations", r#"{"user": "bob"}"#));
        if let Some(entry) = listed["allocations"].as_array().and_then(|a| a.first()) {
            break entry.clone();
        }
        assert!(
            started.elapsed() < CONVERGE,
            "bob's allocation not listed within {CONVERGE:?}: {listed}"
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    let allocation = &listed["allocation"];
    assert_eq!(listed["agentId"], "edge-1", "{listed}");
    assert_eq!(allocation["transport"], "CLIENT_TRANSPORT_UDP", "{listed}");
    assert_eq!(
        allocation["clientAddress"],
        client.local_addr().to_string(),
        "{listed}"
    );
    assert_eq!(allocation["permissions"], 1, "{listed}");
    assert_eq!(allocation["bytesFromClient"], "300", "{listed}");
    assert_eq!(allocation["bytesToClient"], "300", "{listed}");

    // Roles come from the certificates: the front-end may not use the operator API.
    let refused = call(&front_end, "ListAgents", "{}");
    assert_eq!(refused.status.code(), Some(1), "{}", refused.output());
    let error: Value = serde_json::from_str(refused.stderr.trim()).expect("a JSON error");
    assert_eq!(error["error"]["code"], "PermissionDenied", "{error}");
    // A misspelt field is refused before anything is sent.
    let typo = call(&front_end, "IssueMediaCredentials", r#"{"usr": "bob"}"#);
    assert!(!typo.status.success());
    assert!(typo.stderr.contains("usr"), "{}", typo.output());

    // Every RPC kind goes through the same client: a conference, registered and listed.
    json_of(&call(
        &front_end,
        "RegisterConference",
        r#"{"conferenceId": "weekly", "key": "c2VjcmV0LWtleS1vZi0zMi1ieXRlcy1sb25nLi4uLi4=", "expiresAtUnix": "4102444800", "maxParticipants": 10}"#,
    ));
    // A participant joins it on the Web Conferencing Edge with its key, served by the
    // reference conferencing server the all-in-one started.
    let pki = rampart_tests::control::ControlPki { dir: certs.clone() };
    let external: std::net::SocketAddr = "127.0.0.1:8443".parse().unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let joined = runtime.block_on(async {
        let started = Instant::now();
        loop {
            let join = rampart_tests::conferencing::request(
                "weekly",
                b"secret-key-of-32-bytes-long.....",
                false,
            );
            match rampart_tests::conferencing::join(&pki, external, join).await {
                Ok(rampart_tests::conferencing::Joined::Accepted(_)) => return Ok(()),
                Ok(rampart_tests::conferencing::Joined::Refused(frame))
                    if started.elapsed() > CONVERGE =>
                {
                    return Err(format!("{frame:?}"));
                }
                Err(error) if started.elapsed() > CONVERGE => return Err(error.to_string()),
                _ => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    });
    assert_eq!(joined, Ok(()), "{}", edge.log());
    let conferences = json_of(&call(&operator, "ListConferences", "{}"));
    assert!(
        conferences.to_string().contains("\"weekly\""),
        "{conferences}"
    );
    json_of(&call(
        &front_end,
        "RevokeUser",
        r#"{"user": "alice@example.com"}"#,
    ));

    // SIGTERM stops the task and both processes: the ports are free again.
    kill(Pid::from_raw(edge.child.id() as i32), Signal::SIGTERM).unwrap();
    let stopped = Instant::now();
    let status = loop {
        if let Some(status) = edge.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            stopped.elapsed() < Duration::from_secs(25),
            "xtask run did not stop on SIGTERM\n{}",
            edge.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "{status}\n{}", edge.log());
    assert!(
        TcpListener::bind("127.0.0.1:7443").is_ok(),
        "{}",
        edge.log()
    );
    assert!(UdpSocket::bind("127.0.0.1:3478").is_ok(), "{}", edge.log());
    assert!(
        TcpListener::bind("127.0.0.1:8057").is_ok(),
        "{}",
        edge.log()
    );
}
