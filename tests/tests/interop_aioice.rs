//! Interoperability with aioice (Python; the ICE/TURN stack under aiortc), a client we did
//! not write, with its own STUN codec.
//!
//! The test writes a small driver script to the server's temporary directory and runs it:
//! a STUN Binding built and parsed by `aioice.stun`, then for each transport a TURN
//! allocation through `aioice.turn.create_turn_endpoint` (UDP, TCP, TLS), data to a UDP
//! peer on loopback that echoes it back, and the allocation deleted. aioice binds a channel
//! for each peer before sending, so the data runs as ChannelData both ways. The script
//! prints one JSON object; the test asserts on it.
//!
//! aioice must be importable by `python3` (`cargo xtask setup` installs it with pip); a
//! missing module fails the test with that hint.

use std::net::{IpAddr, SocketAddr};
use std::process::Command;
use std::time::Duration;

use rampart_tests::client::loopback;
use rampart_tests::tools::{self, Finished};
use rampart_tests::{PASSWORD, PEER_V4, Proto, REST_SECRET, Rampart, RampartConfig, USER};
use serde_json::{Value, json};

const SCRIPT: &str = r#"
import asyncio, json, socket, ssl, sys

from aioice import stun, turn

TIMEOUT = 10
cfg = json.loads(sys.argv[1])


def binding(server):
    """A Binding request encoded and decoded by aioice's own STUN codec."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(TIMEOUT)
    sock.bind(("127.0.0.1", 0))
    try:
        request = stun.Message(message_method=stun.Method.BINDING,
                               message_class=stun.Class.REQUEST)
        sock.sendto(bytes(request), server)
        data, _ = sock.recvfrom(2048)
        response = stun.parse_message(data)
        return {
            "class": str(response.message_class),
            "same_transaction": response.transaction_id == request.transaction_id,
            "mapped": list(response.attributes["XOR-MAPPED-ADDRESS"]),
            "local": list(sock.getsockname()),
        }
    finally:
        sock.close()


class Collect(asyncio.DatagramProtocol):
    def __init__(self):
        self.queue = asyncio.Queue()
        self.closed = asyncio.get_running_loop().create_future()

    def datagram_received(self, data, addr):
        self.queue.put_nowait((data, addr))

    def error_received(self, exc):
        self.queue.put_nowait((None, repr(exc)))

    def connection_lost(self, exc):
        if not self.closed.done():
            self.closed.set_result(exc)


async def relay(run):
    loop = asyncio.get_running_loop()
    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    peer.setblocking(False)
    peer.bind((cfg["peer_ip"], 0))
    peer_addr = peer.getsockname()

    kwargs = {"transport": "udp" if run["transport"] == "udp" else "tcp"}
    if run["transport"] == "tls":
        context = ssl.create_default_context(cafile=cfg["ca"])
        kwargs["ssl"] = context
    transport, protocol = await asyncio.wait_for(
        turn.create_turn_endpoint(
            Collect, (run["host"], run["port"]), run["username"], run["password"], **kwargs),
        TIMEOUT)
    relayed = transport.get_extra_info("sockname")
    sent, echoed, wrong = 0, 0, []
    try:
        for i in range(cfg["messages"]):
            payload = ("aioice %s #%d " % (run["transport"], i)).encode() + bytes(range(i % 7))
            transport.sendto(payload, peer_addr)
            sent += 1
            data, source = await asyncio.wait_for(loop.sock_recvfrom(peer, 2048), TIMEOUT)
            if data != payload or tuple(source[:2]) != tuple(relayed[:2]):
                wrong.append("peer got %r from %r" % (data, source))
            await loop.sock_sendto(peer, data, source)
            data, source = await asyncio.wait_for(protocol.queue.get(), TIMEOUT)
            if data == payload and tuple(source[:2]) == tuple(peer_addr[:2]):
                echoed += 1
            else:
                wrong.append("client got %r from %r" % (data, source))
    finally:
        transport.close()
        await asyncio.wait_for(protocol.closed, TIMEOUT)
        peer.close()
    return {"transport": run["transport"], "relayed": list(relayed[:2]),
            "peer": list(peer_addr[:2]), "sent": sent, "echoed": echoed, "wrong": wrong}


async def main():
    result = {"binding": binding(tuple(cfg["stun"])), "runs": []}
    for run in cfg["runs"]:
        result["runs"].append(await relay(run))
    print(json.dumps(result))


asyncio.run(main())
"#;

const MESSAGES: usize = 10;

#[test]
fn aioice_binding_and_turn_over_udp_tcp_tls() {
    let python = python_with_aioice();
    let config = RampartConfig::loopback(&[
        (Proto::Udp, loopback(false)),
        (Proto::Tcp, loopback(false)),
        (Proto::Tls, loopback(false)),
    ]);
    let server = Rampart::start(&config).expect("start rampart");
    let script = server.dir().join("aioice_driver.py");
    std::fs::write(&script, SCRIPT).unwrap();

    let (rest_user, rest_pass) =
        rampart_tests::rest_credentials(REST_SECRET, "aioice", Duration::from_secs(600));
    let udp = server.loopback_addr(Proto::Udp, false);
    let tcp = server.loopback_addr(Proto::Tcp, false);
    let tls = server.loopback_addr(Proto::Tls, false);
    let run = |transport: &str, host: &str, port: u16, user: &str, pass: &str| json!({"transport": transport, "host": host, "port": port, "username": user, "password": pass});
    let runs = vec![
        run("udp", "127.0.0.1", udp.port(), USER, PASSWORD),
        run("udp", "127.0.0.1", udp.port(), &rest_user, &rest_pass),
        run("tcp", "127.0.0.1", tcp.port(), USER, PASSWORD),
        // The certificate names `localhost`; aioice verifies against the host it dials.
        run("tls", "localhost", tls.port(), USER, PASSWORD),
    ];
    let cfg = json!({
        "stun": ["127.0.0.1", udp.port()],
        "peer_ip": PEER_V4.to_string(),
        "ca": server.ca_pem_path().unwrap(),
        "messages": MESSAGES,
        "runs": runs,
    });
    let finished = tools::run_bounded(
        Command::new(&python).arg(&script).arg(cfg.to_string()),
        Duration::from_secs(90),
    )
    .unwrap();
    assert!(
        finished.status.success(),
        "aioice driver failed\n{}",
        finished.output()
    );
    let out: Value = serde_json::from_str(finished.stdout.trim())
        .unwrap_or_else(|e| panic!("driver output is not JSON: {e}\n{}", finished.output()));

    // STUN Binding, checked with aioice's codec: the mapped address is the socket itself.
    let binding = &out["binding"];
    assert_eq!(binding["same_transaction"], true, "{binding}");
    let mapped = address(&binding["mapped"]);
    assert_eq!(
        mapped,
        address(&binding["local"]),
        "XOR-MAPPED-ADDRESS must be 127.0.0.1:<the client's port>"
    );
    assert_eq!(mapped.ip(), loopback(false));

    // Each TURN run: every message reached the peer from the relayed address and came back
    // to the client from the peer.
    let done = out["runs"].as_array().expect("runs");
    assert_eq!(done.len(), runs.len(), "{out}");
    let (first, last) = server.relay_range();
    for run in done {
        assert_eq!(run["sent"], MESSAGES, "{run}");
        assert_eq!(run["echoed"], MESSAGES, "lost or garbled data: {run}");
        assert_eq!(run["wrong"], json!([]), "{run}");
        let relayed = address(&run["relayed"]);
        assert_eq!(relayed.ip(), loopback(false), "{run}");
        assert!((first..=last).contains(&relayed.port()), "{run}");
    }
    let log = server.log();
    assert!(
        log.lines()
            .any(|l| l.contains("allocation created") && l.contains(":aioice")),
        "one allocation must be made under the REST API username"
    );
}

/// `python3` if it can import aioice; otherwise the test fails with the installation hint.
fn python_with_aioice() -> std::path::PathBuf {
    let python = tools::require("python3", "Python 3");
    let check = tools::run_bounded(
        Command::new(&python).args(["-c", "import aioice"]),
        Duration::from_secs(30),
    );
    match check {
        Ok(Finished { status, .. }) if status.success() => python,
        Ok(finished) => panic!(
            "aioice is not importable by {}: `cargo xtask setup` installs it (pip install aioice; \
             CI installs it through xtask)\n{}",
            python.display(),
            finished.output()
        ),
        Err(e) => panic!("running {}: {e:#}", python.display()),
    }
}

/// `["ip", port]` as a socket address.
fn address(value: &Value) -> SocketAddr {
    let ip: IpAddr = value[0]
        .as_str()
        .and_then(|ip| ip.parse().ok())
        .unwrap_or_else(|| panic!("an IP in {value}"));
    let port = value[1]
        .as_u64()
        .and_then(|p| u16::try_from(p).ok())
        .unwrap_or_else(|| panic!("a port in {value}"));
    SocketAddr::new(ip, port)
}
