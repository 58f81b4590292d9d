//! The Access Edge's SIP parser and stream framer on arbitrary bytes.
//!
//! - `Message::parse` must not panic, and whatever it accepts must serialize to bytes it accepts
//!   again (the edge forwards `to_bytes()` of what it parsed, never the bytes as received).
//! - The `Framer` must not panic or loop on any stream: frames are pulled until it asks for
//!   more bytes or gives up on the stream, and every frame consumes input.
//!
//! Seeds: the RFC 4475 torture messages (`corpus/sip_parser`, copies of
//! `relay-user/sip/tests/data/rfc4475`). Run with `cargo xtask test`, or by hand:
//! `cargo +nightly fuzz run sip_parser -- -max_total_time=60` in `relay-user`.

#![no_main]

use libfuzzer_sys::fuzz_target;
use rampart_sip::{Framer, Limits, Message};

fuzz_target!(|data: &[u8]| {
    let limits = Limits::default();

    if let Ok(message) = Message::parse(data, &limits) {
        let bytes = message.to_bytes();
        if let Err(error) = Message::parse(&bytes, &limits) {
            panic!(
                "the serialization of an accepted message does not parse ({error:?}):\n{}",
                String::from_utf8_lossy(&bytes)
            );
        }
    }

    let mut framer = Framer::new(limits);
    framer.push(data);
    // Every frame consumes at least two bytes, so this ends; the bound only guards against a
    // framer that stops consuming.
    for _ in 0..=data.len() {
        match framer.next_frame() {
            Ok(Some(_frame)) => {}
            Ok(None) | Err(_) => return,
        }
    }
    panic!("the framer returned more frames than there are bytes");
});
