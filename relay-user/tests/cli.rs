//! The `rampart` command line as an operator meets it: the embedded default and the printed
//! starting point validate, and a configuration that cannot be used is refused before anything
//! is bound, with exit status 2 and a message naming the file and the problem.
//!
//! Being an integration test of this package also makes `cargo test --workspace` build the
//! `rampart` binary, which the end-to-end tests in `tests/` start.

use std::process::{Command, Output};

fn rampart(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_rampart"))
        .args(args)
        .output()
        .expect("the rampart binary runs")
}

#[test]
fn the_embedded_default_and_the_printed_one_validate() {
    let checked = rampart(&["--check-config"]);
    assert!(checked.status.success(), "{checked:?}");
    assert_eq!(
        String::from_utf8_lossy(&checked.stdout),
        "configuration OK\n"
    );

    let printed = rampart(&["--print-default-config"]);
    assert!(printed.status.success());
    let dir = std::env::temp_dir().join(format!("rampart-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("printed.toml");
    std::fs::write(&path, &printed.stdout).unwrap();
    let reloaded = rampart(&["--check-config", "--config", path.to_str().unwrap()]);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(reloaded.status.success(), "{reloaded:?}");
}

#[test]
fn an_unusable_configuration_is_refused_with_the_file_and_the_reason() {
    let dir = std::env::temp_dir().join(format!("rampart-cli-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let missing = dir.join("missing.toml");
    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "[turn]\nrealm = 7\n").unwrap();
    for path in [&missing, &bad] {
        let refused = rampart(&["--check-config", "--config", path.to_str().unwrap()]);
        let stderr = String::from_utf8_lossy(&refused.stderr);
        assert_eq!(refused.status.code(), Some(2), "{stderr}");
        assert!(
            stderr.contains(&path.display().to_string()),
            "the message names the file: {stderr}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
