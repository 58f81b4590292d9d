//! What `cargo xtask run` starts: `rampart` with no configuration, on its embedded default
//! (TURN on 127.0.0.1:3478 and [::1]:3478, test user `demo`). A STUN client and a TURN client
//! we did not write (coturn's) use it with exactly what the start-up banner tells a user.

use std::net::UdpSocket;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rampart_tests::process::binary;
use rampart_tests::tools::{self, die_with_parent};

const INSTALL_HINT: &str = "coturn (turnutils_stunclient, turnutils_uclient)";

/// Kills the agent when the test ends, however it ends.
struct Agent(std::process::Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// turnutils_stunclient waits forever for an answer to a request sent before the agent had
/// bound its port: wait until 127.0.0.1:3478 answers a Binding of our own first (bounded).
fn wait_until_answering() {
    // A Binding request: type 0x0001, length 0, magic cookie, transaction id.
    let mut request = vec![0, 1, 0, 0, 0x21, 0x12, 0xa4, 0x42];
    request.extend_from_slice(&[7; 12]);
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 128];
    loop {
        socket.send_to(&request, "127.0.0.1:3478").unwrap();
        if socket.recv_from(&mut buf).is_ok() {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no STUN answer on 127.0.0.1:3478 within 30 s (is something else on that port?)"
        );
    }
}

#[test]
fn embedded_default_answers_stun_and_relays_for_the_demo_user() {
    let stunclient = tools::require("turnutils_stunclient", INSTALL_HINT);
    let uclient = tools::require("turnutils_uclient", INSTALL_HINT);
    let _agent = Agent(
        die_with_parent(
            Command::new(binary())
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        )
        .spawn()
        .expect("start rampart"),
    );
    wait_until_answering();
    let run = tools::run_bounded(
        Command::new(&stunclient).arg("127.0.0.1"),
        Duration::from_secs(15),
    )
    .unwrap();
    let reflexive = run
        .stdout
        .lines()
        .find_map(|l| l.split("UDP reflexive addr: ").nth(1).map(str::trim))
        .unwrap_or_else(|| panic!("no reflexive address from stunclient: {}", run.output()))
        .to_owned();
    let reflexive: std::net::SocketAddr = reflexive.parse().expect("a socket address");
    assert_eq!(reflexive.ip().to_string(), "127.0.0.1");
    assert_ne!(reflexive.port(), 3478);

    // The command the banner prints: two clients relaying to each other.
    let run = tools::run_bounded(
        Command::new(&uclient).args([
            "-u",
            "demo",
            "-w",
            "rampart-demo",
            "-y",
            "-n",
            "10",
            "127.0.0.1",
        ]),
        Duration::from_secs(60),
    )
    .unwrap();
    let output = run.output();
    assert!(
        output.contains("Total lost packets 0 "),
        "uclient lost packets or failed: {output}"
    );
    let totals = output
        .lines()
        .rev()
        .find_map(|l| l.split("start_mclient: tot_send_msgs=").nth(1))
        .unwrap_or_else(|| panic!("no totals in uclient's output: {output}"));
    let (sent, received) = totals
        .split_once(", tot_recv_msgs=")
        .expect("uclient prints sent and received totals");
    assert_eq!(sent.trim(), received.trim(), "{output}");
    assert_ne!(sent.trim(), "0", "{output}");
}
