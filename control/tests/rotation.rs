//! Certificate rotation without failed RPCs, and the connection limits.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::AsyncReadExt as _;
use tokio::net::TcpStream;

use common::*;
use proto::control::v1::GetAccessPolicyRequest;
use proto::control::v1::front_end_client::FrontEndClient;

#[tokio::test]
async fn a_rotated_server_certificate_is_picked_up_with_no_failed_rpc() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new("test CA");
    write_tls_files(dir.path(), &pki, &pki.server(&[SERVER_NAME], 1));
    let server = TestServer::start_with(dir.path(), &config_text(""), |config| {
        config.tls_reload_interval = Duration::from_millis(100);
    })
    .await;
    let addr = server.addr;
    let tls = client_config(&pki, &pki.front_end());

    // Before the rotation the server does not answer to the new name.
    assert!(
        channel_named(addr, tls.clone(), "rotated.rampart.test")
            .await
            .is_err()
    );

    // RPCs in a loop across the rotation: on one long-lived connection, and each on a
    // connection of its own (the ones that see the new certificate).
    let stop = Arc::new(AtomicBool::new(false));
    let calls = Arc::new(AtomicUsize::new(0));
    let looping = {
        let (stop, calls, tls) = (stop.clone(), calls.clone(), tls.clone());
        tokio::spawn(async move {
            let mut long_lived = FrontEndClient::new(channel(addr, tls.clone()).await);
            while !stop.load(Ordering::Relaxed) {
                long_lived
                    .get_access_policy(GetAccessPolicyRequest {})
                    .await
                    .expect("RPC on the long-lived connection");
                FrontEndClient::new(channel(addr, tls.clone()).await)
                    .get_access_policy(GetAccessPolicyRequest {})
                    .await
                    .expect("RPC on a new connection");
                calls.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Rotate as a careless tool would: certificate first, key a moment later. In between the
    // files do not match and the server must keep the old pair.
    let rotated = pki.server(&[SERVER_NAME, "rotated.rampart.test"], 2);
    std::fs::write(dir.path().join("server.pem"), &rotated.cert_pem).unwrap();
    tokio::time::sleep(Duration::from_millis(350)).await;
    std::fs::write(dir.path().join("server.key"), &rotated.key_pem).unwrap();

    let deadline = tokio::time::Instant::now() + STEP;
    while channel_named(addr, tls.clone(), "rotated.rampart.test")
        .await
        .is_err()
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the rotated certificate is served"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::Relaxed);
    tokio::time::timeout(STEP, looping)
        .await
        .expect("the loop stops")
        .expect("no RPC failed across the rotation");
    assert!(
        calls.load(Ordering::Relaxed) >= 10,
        "the loop ran across the rotation"
    );
    server.stop().await;
}

/// Waits until the server closes `stream` (EOF or error).
async fn closed_by_server(stream: &mut TcpStream) -> bool {
    let mut buf = [0u8; 16];
    matches!(
        tokio::time::timeout(STEP, stream.read(&mut buf)).await,
        Ok(Ok(0) | Err(_))
    )
}

#[tokio::test]
async fn connection_limit_per_source_and_handshake_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new("test CA");
    write_tls_files(dir.path(), &pki, &pki.server(&[SERVER_NAME], 1));
    let server = TestServer::start_with(dir.path(), &config_text(""), |config| {
        config.limits.per_source = 2;
        config.limits.handshake_timeout = Duration::from_millis(1500);
    })
    .await;

    // Two silent connections hold both slots of 127.0.0.1; a third is closed at once.
    let mut first = TcpStream::connect(server.addr).await.unwrap();
    let mut second = TcpStream::connect(server.addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut third = TcpStream::connect(server.addr).await.unwrap();
    let started = tokio::time::Instant::now();
    assert!(closed_by_server(&mut third).await);
    // Refused at once, well before the handshake timeout would have closed it.
    assert!(
        started.elapsed() < Duration::from_millis(1000),
        "refused before any timeout"
    );

    // The silent ones are dropped when their handshake times out, freeing the slots.
    assert!(closed_by_server(&mut first).await);
    assert!(closed_by_server(&mut second).await);
    assert!(started.elapsed() >= Duration::from_millis(1000));
    probe(server.addr, client_config(&pki, &pki.front_end()))
        .await
        .unwrap();
    server.stop().await;
}
