//! The reference server's command line: bad certificate paths and names are refused with a
//! message that says which, before anything is dialled.

use std::process::Command;

fn run(args: &[&str]) -> (bool, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_rampart-conference-server"))
        .args(args)
        .output()
        .expect("run rampart-conference-server");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn missing_files_and_bad_names_are_refused_clearly() {
    let (ok, stderr) = run(&[
        "--edge",
        "127.0.0.1:8057",
        "--server-name",
        "edge.example.org",
        "--ca",
        "/nonexistent/ca.pem",
        "--certificate",
        "/nonexistent/server.pem",
        "--private-key",
        "/nonexistent/server.key",
    ]);
    assert!(!ok);
    assert!(stderr.contains("/nonexistent/ca.pem"), "{stderr}");

    let (ok, stderr) = run(&[
        "--edge",
        "127.0.0.1:8057",
        "--server-name",
        "not a name",
        "--ca",
        "ca.pem",
        "--certificate",
        "c.pem",
        "--private-key",
        "c.key",
    ]);
    assert!(!ok);
    assert!(stderr.contains("not a name"), "{stderr}");

    let (ok, stderr) = run(&["--edge", "nowhere"]);
    assert!(!ok);
    assert!(stderr.contains("--edge"), "{stderr}");
}
