//! An independent gRPC client, generated from the `.proto` files by Python's grpcio-tools (not
//! our Rust client, not our codegen), calls the front-end API over mutual TLS with a front-end
//! certificate, and is refused an operator RPC with it.

mod common;

use std::process::Command;

use base64::Engine as _;
use hmac::{Hmac, Mac as _};

use common::*;

const SCRIPT: &str = r#"
import json, sys
import grpc
sys.path.insert(0, sys.argv[1])
from rampart.control.v1 import frontend_pb2, frontend_pb2_grpc, operator_pb2, operator_pb2_grpc

directory, address, server_name = sys.argv[1], sys.argv[2], sys.argv[3]
read = lambda name: open(f"{directory}/{name}", "rb").read()
credentials = grpc.ssl_channel_credentials(
    root_certificates=read("ca.pem"),
    private_key=read("client.key"),
    certificate_chain=read("client.pem"),
)
channel = grpc.secure_channel(
    address, credentials, options=[("grpc.ssl_target_name_override", server_name)]
)
issued = frontend_pb2_grpc.FrontEndStub(channel).IssueMediaCredentials(
    frontend_pb2.IssueMediaCredentialsRequest(user="sip:bob@example.com", lifetime_seconds=300),
    timeout=10,
)
try:
    operator_pb2_grpc.OperatorStub(channel).ListAgents(operator_pb2.ListAgentsRequest(), timeout=10)
    refused = "no"
except grpc.RpcError as error:
    refused = error.code().name
print(json.dumps({
    "username": issued.username,
    "password": issued.password,
    "turn_uris": list(issued.turn_uris),
    "operator_rpc": refused,
}))
"#;

#[tokio::test]
async fn a_python_grpc_client_calls_the_front_end_api_with_its_certificate() {
    let python_ok = Command::new("python3")
        .args(["-c", "import grpc, grpc_tools"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        python_ok,
        "Python grpcio and grpcio-tools are missing: `cargo xtask setup` installs them"
    );
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new("test CA");
    let server = TestServer::start(dir.path(), &pki).await;
    let front_end = pki.front_end();
    std::fs::write(dir.path().join("client.pem"), &front_end.cert_pem).unwrap();
    std::fs::write(dir.path().join("client.key"), &front_end.key_pem).unwrap();

    let protos = concat!(env!("CARGO_MANIFEST_DIR"), "/../proto/proto");
    let stubs = dir.path().join("stubs");
    std::fs::create_dir_all(&stubs).unwrap();
    let mut protoc = Command::new("python3");
    protoc.args(["-m", "grpc_tools.protoc", "-I", protos]);
    protoc.arg(format!("--python_out={}", stubs.display()));
    protoc.arg(format!("--grpc_python_out={}", stubs.display()));
    for file in ["common", "frontend", "agent", "operator"] {
        protoc.arg(format!("{protos}/rampart/control/v1/{file}.proto"));
    }
    let generated = protoc.output().unwrap();
    assert!(
        generated.status.success(),
        "grpc_tools.protoc: {}",
        String::from_utf8_lossy(&generated.stderr)
    );
    // Copy the credentials where the script looks for them, next to the stubs.
    for name in ["ca.pem", "client.pem", "client.key"] {
        std::fs::copy(dir.path().join(name), stubs.join(name)).unwrap();
    }

    let address = server.addr.to_string();
    let stubs_path = stubs.display().to_string();
    let run = tokio::task::spawn_blocking(move || {
        Command::new("python3")
            .args(["-c", SCRIPT, &stubs_path, &address, SERVER_NAME])
            .output()
    })
    .await
    .unwrap()
    .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "the Python client failed: {stdout}{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let answer: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    let username = answer["username"].as_str().unwrap();
    let (expiry, user) = username.split_once(':').unwrap();
    assert_eq!(user, "sip:bob@example.com");
    let expiry: u64 = expiry.parse().unwrap();
    assert!(expiry > now_unix() && expiry <= now_unix() + 300 + 5);
    let mut mac = Hmac::<sha1::Sha1>::new_from_slice(REST_SECRET.as_bytes()).unwrap();
    mac.update(username.as_bytes());
    let expected = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    assert_eq!(answer["password"].as_str().unwrap(), expected);
    assert!(!answer["turn_uris"].as_array().unwrap().is_empty());
    assert_eq!(answer["operator_rpc"], "PERMISSION_DENIED");
    server.stop().await;
}
