//! The RFC 4475 torture messages against the strict parser, each as one complete message (a
//! datagram's view; the end-to-end test sends them over TLS). Valid ones parse, invalid ones
//! are refused, and nothing panics.

use std::path::PathBuf;

use rampart_sip::{Limits, Message};

fn data() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/rfc4475")
}

/// Valid in RFC 4475, refused by the edge on purpose (see the comments).
const STRICTER_THAN_RFC: &[&str] = &[
    // A NUL octet inside a quoted string: the edge refuses NUL anywhere in the header section,
    // so that no parser behind it can be made to truncate a value.
    "intmeth",
    // RFC 2543 syntax without Content-Length: on a stream the body could not be found.
    "inv2543",
    // Extra octets after the message, in a datagram: a stream would see them as the next
    // message; as one datagram they make Content-Length disagree.
    "dblreq",
];

/// Invalid in RFC 4475 but parseable: the proxy core answers them (483, 416, 420) or the
/// edge passes a header it does not read (Date).
const FOR_THE_PROXY: &[&str] = &["baddate"];

#[test]
fn valid_messages_parse_and_invalid_ones_are_refused() {
    let expectations = std::fs::read_to_string(data().join("expectations.txt")).unwrap();
    let mut wrong = Vec::new();
    for line in expectations.lines().filter(|l| !l.trim().is_empty()) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (name, verdict) = (fields[0], fields[1]);
        let bytes = std::fs::read(data().join(format!("{name}.dat"))).unwrap();
        let parsed = Message::parse(&bytes, &Limits::default());
        let expected_ok = match verdict {
            "valid" => !STRICTER_THAN_RFC.contains(&name),
            _ => FOR_THE_PROXY.contains(&name),
        };
        if parsed.is_ok() != expected_ok {
            wrong.push(format!(
                "{name} ({verdict}): {:?}",
                parsed.as_ref().map(|m| &m.start)
            ));
        }
        if let Ok(message) = parsed {
            let again = Message::parse(&message.to_bytes(), &Limits::default());
            assert!(
                again.is_ok(),
                "{name}: what the edge sends must parse again: {again:?}"
            );
        }
    }
    assert!(wrong.is_empty(), "misjudged:\n{}", wrong.join("\n"));
}
