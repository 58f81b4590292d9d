//! Cutting a TLS/TCP byte stream into SIP messages (RFC 3261 section 18.3) and RFC 5626
//! keep-alives (a CRLF CRLF ping, answered with a CRLF pong).

use super::message::{Limits, Message, ParseError, find};

#[derive(Debug)]
pub enum Frame {
    Message(Message),
    /// A complete message that did not parse; the stream is still in step.
    Invalid(ParseError),
    /// Double CRLF: the peer wants a single CRLF back.
    Ping,
    /// Single CRLF: the answer to our ping.
    Pong,
}

pub struct Framer {
    limits: Limits,
    buffer: Vec<u8>,
    /// Where the unconsumed bytes start: consumed ones are dropped in one move when the
    /// buffer runs dry or grows, not once per message.
    start: usize,
    /// Where to resume looking for the end of the headers, relative to `start`.
    scanned: usize,
}

impl Framer {
    pub fn new(limits: Limits) -> Framer {
        Framer {
            limits,
            buffer: Vec::new(),
            start: 0,
            scanned: 0,
        }
    }

    pub fn push(&mut self, bytes: &[u8]) {
        if self.start > 0 {
            self.buffer.drain(..self.start);
            self.start = 0;
        }
        self.buffer.extend_from_slice(bytes);
    }

    /// Bytes of a message that has begun but not ended (a slow sender holds these).
    pub fn pending(&self) -> usize {
        self.buffer.len() - self.start
    }

    /// The next frame, `Ok(None)` when more bytes are needed. An error means the stream
    /// cannot be followed any further (the connection is to be closed); it carries the
    /// request's identity when a response can still be sent.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, ParseError> {
        let start = self.start;
        let buffered = &self.buffer[start..];
        if buffered.starts_with(b"\r\n\r\n") {
            self.consume(4);
            return Ok(Some(Frame::Ping));
        }
        if buffered.starts_with(b"\r\n") && buffered.get(2).is_some_and(|b| *b != b'\r') {
            self.consume(2);
            return Ok(Some(Frame::Pong));
        }
        if buffered.starts_with(b"\r") && buffered.len() < 4 {
            return Ok(None);
        }
        let from = self.scanned.saturating_sub(3);
        let Some(head_end) = find(&buffered[from..], b"\r\n\r\n").map(|at| at + from) else {
            self.scanned = buffered.len();
            if buffered.len() > self.limits.max_message_bytes {
                return Err(too_large());
            }
            return Ok(None);
        };
        let content_length = content_length(&buffered[..head_end]).map_err(|reason| {
            // The whole head is here: answer with the request's identity if it has one.
            let mut error = ParseError {
                status: 400,
                reason,
                request: None,
            };
            let mut head = buffered[..head_end].to_vec();
            head.extend_from_slice(b"\r\n\r\n");
            if let Err(parsed) = Message::parse(&head, &self.limits) {
                error.request = parsed.request;
            }
            error
        })?;
        let total = head_end + 4 + content_length;
        if total > self.limits.max_message_bytes {
            return Err(too_large());
        }
        if buffered.len() < total {
            self.scanned = head_end;
            return Ok(None);
        }
        let frame = match Message::parse(&buffered[..total], &self.limits) {
            Ok(message) => Frame::Message(message),
            Err(error) => Frame::Invalid(error),
        };
        self.consume(total);
        Ok(Some(frame))
    }

    fn consume(&mut self, count: usize) {
        self.start += count;
        self.scanned = 0;
        if self.start == self.buffer.len() {
            self.buffer.clear();
            self.start = 0;
        }
    }
}

fn too_large() -> ParseError {
    ParseError {
        status: 513,
        reason: "Message Too Large",
        request: None,
    }
}

/// The Content-Length of a header section, 0 when absent (the parser then refuses a body).
fn content_length(head: &[u8]) -> Result<usize, &'static str> {
    let mut found = None;
    for line in head.split(|b| *b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(colon) = line.iter().position(|b| *b == b':') else {
            continue;
        };
        let name = line[..colon].trim_ascii_end();
        if !(name.eq_ignore_ascii_case(b"content-length") || name.eq_ignore_ascii_case(b"l")) {
            continue;
        }
        let value = line[colon + 1..].trim_ascii();
        if value.is_empty() || value.len() > 9 || !value.iter().all(u8::is_ascii_digit) {
            return Err("Bad Request: Content-Length");
        }
        let length: usize = std::str::from_utf8(value)
            .ok()
            .and_then(|v| v.parse().ok())
            .ok_or("Bad Request: Content-Length")?;
        if found.replace(length).is_some_and(|other| other != length) {
            return Err("Bad Request: conflicting Content-Length");
        }
    }
    Ok(found.unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    const OPTIONS: &[u8] = b"OPTIONS sip:corp.example SIP/2.0\r\nVia: SIP/2.0/TLS a.example;branch=z9hG4bK1\r\n\
        From: <sip:a@a.example>;tag=1\r\nTo: <sip:corp.example>\r\nCall-ID: c1\r\nCSeq: 1 OPTIONS\r\n\
        Content-Length: 2\r\n\r\nok";

    #[test]
    fn cuts_messages_byte_by_byte_and_keepalives() {
        let mut framer = Framer::new(Limits::default());
        let mut stream = b"\r\n\r\n".to_vec();
        stream.extend_from_slice(OPTIONS);
        stream.extend_from_slice(OPTIONS);
        stream.extend_from_slice(b"\r\nX");
        let mut frames = Vec::new();
        for byte in &stream {
            framer.push(std::slice::from_ref(byte));
            while let Some(frame) = framer.next_frame().unwrap() {
                frames.push(frame);
            }
        }
        assert!(matches!(frames[0], Frame::Ping));
        assert!(matches!(&frames[1], Frame::Message(m) if m.body == b"ok"));
        assert!(matches!(&frames[2], Frame::Message(_)));
        assert!(matches!(frames[3], Frame::Pong));
        assert_eq!(frames.len(), 4);
        assert_eq!(framer.pending(), 1);
    }

    #[test]
    fn a_bad_message_keeps_the_stream_in_step_and_oversize_ends_it() {
        let mut framer = Framer::new(Limits::default());
        let bad = String::from_utf8_lossy(OPTIONS).replace("CSeq: 1 OPTIONS", "CSeq: x");
        framer.push(bad.as_bytes());
        framer.push(OPTIONS);
        assert!(matches!(
            framer.next_frame().unwrap(),
            Some(Frame::Invalid(_))
        ));
        assert!(matches!(
            framer.next_frame().unwrap(),
            Some(Frame::Message(_))
        ));

        let mut framer = Framer::new(Limits::default());
        framer.push(&vec![b'a'; 70_000]);
        assert_eq!(framer.next_frame().unwrap_err().status, 513);

        let mut framer = Framer::new(Limits::default());
        let negative =
            String::from_utf8_lossy(OPTIONS).replace("Content-Length: 2", "Content-Length: -2");
        framer.push(negative.as_bytes());
        let error = framer.next_frame().unwrap_err();
        assert!(error.request.is_some(), "a 400 can still be sent");
    }
}
