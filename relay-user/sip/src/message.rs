//! SIP messages (RFC 3261 section 7): a strict parser with limits, and the serializer.
//!
//! Strict because this is the edge: whatever the internal side receives was produced by
//! [`Message::to_bytes`] from values this parser accepted, never copied through as received.
//! Header values are kept as text with folded lines joined; a CR, LF or NUL can never reach
//! one, so nothing sent inwards can smuggle a header the edge did not see.

use std::fmt::Write as _;

/// Limits on what a peer may send. An edge sees messages of a few kilobytes; anything much
/// larger is an attack or a broken client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Start line, headers and body together.
    pub max_message_bytes: usize,
    pub max_headers: usize,
    /// One header line, folded continuation lines included.
    pub max_line_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message_bytes: 65_536,
            max_headers: 128,
            max_line_bytes: 8_192,
        }
    }
}

/// Why a message was refused, and the response status that says so.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct ParseError {
    /// 400, 413 (too large), 505 (version) or 416/420-style statuses are not used: every
    /// syntax fault is 400 with a reason phrase naming it.
    pub status: u16,
    pub reason: &'static str,
    /// The request's identifying headers when they parsed, so a response can be built; `None`
    /// when the message is a response or too broken to answer.
    pub request: Option<Box<RequestIdentity>>,
}

/// What a response to a rejected request needs (RFC 3261 section 8.2.6.2).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestIdentity {
    pub method: String,
    pub vias: Vec<String>,
    pub from: String,
    pub to: String,
    pub call_id: String,
    pub cseq: String,
}

impl ParseError {
    fn new(reason: &'static str) -> Self {
        ParseError {
            status: 400,
            reason,
            request: None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StartLine {
    Request { method: String, uri: String },
    Response { status: u16, reason: String },
}

/// Header names the proxy looks at, with their compact forms (RFC 3261 section 7.3.3).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum HeaderName {
    Via,
    From,
    To,
    CallId,
    CSeq,
    MaxForwards,
    ContentLength,
    ContentType,
    Contact,
    Route,
    RecordRoute,
    Path,
    Server,
    UserAgent,
    Expires,
    Require,
    ProxyRequire,
    Supported,
    /// Any other header, by its name as received (compared case-insensitively).
    Other(String),
}

impl HeaderName {
    fn parse(name: &str) -> HeaderName {
        let known = [
            ("via", "v", HeaderName::Via),
            ("from", "f", HeaderName::From),
            ("to", "t", HeaderName::To),
            ("call-id", "i", HeaderName::CallId),
            ("cseq", "", HeaderName::CSeq),
            ("max-forwards", "", HeaderName::MaxForwards),
            ("content-length", "l", HeaderName::ContentLength),
            ("content-type", "c", HeaderName::ContentType),
            ("contact", "m", HeaderName::Contact),
            ("route", "", HeaderName::Route),
            ("record-route", "", HeaderName::RecordRoute),
            ("path", "", HeaderName::Path),
            ("server", "", HeaderName::Server),
            ("user-agent", "", HeaderName::UserAgent),
            ("expires", "", HeaderName::Expires),
            ("require", "", HeaderName::Require),
            ("proxy-require", "", HeaderName::ProxyRequire),
            ("supported", "k", HeaderName::Supported),
        ];
        for (full, compact, header) in known {
            if name.eq_ignore_ascii_case(full)
                || (!compact.is_empty() && name.eq_ignore_ascii_case(compact))
            {
                return header;
            }
        }
        HeaderName::Other(name.to_owned())
    }

    pub fn as_str(&self) -> &str {
        match self {
            HeaderName::Via => "Via",
            HeaderName::From => "From",
            HeaderName::To => "To",
            HeaderName::CallId => "Call-ID",
            HeaderName::CSeq => "CSeq",
            HeaderName::MaxForwards => "Max-Forwards",
            HeaderName::ContentLength => "Content-Length",
            HeaderName::ContentType => "Content-Type",
            HeaderName::Contact => "Contact",
            HeaderName::Route => "Route",
            HeaderName::RecordRoute => "Record-Route",
            HeaderName::Path => "Path",
            HeaderName::Server => "Server",
            HeaderName::UserAgent => "User-Agent",
            HeaderName::Expires => "Expires",
            HeaderName::Require => "Require",
            HeaderName::ProxyRequire => "Proxy-Require",
            HeaderName::Supported => "Supported",
            HeaderName::Other(name) => name,
        }
    }

    /// Equality with names compared as SIP does (case-insensitively).
    pub fn same(&self, other: &HeaderName) -> bool {
        match (self, other) {
            (HeaderName::Other(own), HeaderName::Other(theirs)) => own.eq_ignore_ascii_case(theirs),
            (own, theirs) => own == theirs,
        }
    }

    /// Headers whose value is a comma-separated list of entries that may be split into
    /// one header each (RFC 3261 section 7.3.1).
    fn is_list(&self) -> bool {
        matches!(
            self,
            HeaderName::Via | HeaderName::Route | HeaderName::RecordRoute | HeaderName::Path
        )
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub name: HeaderName,
    pub value: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    pub start: StartLine,
    /// In order. List headers (Via, Route, Record-Route, Path) hold one entry each.
    pub headers: Vec<Header>,
    pub body: Vec<u8>,
}

fn is_token_char(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || b"-.!%*_+`'~".contains(&byte)
}

fn is_token(text: &str) -> bool {
    !text.is_empty() && text.bytes().all(is_token_char)
}

/// Splits a list header value at commas outside quoted strings and angle brackets.
pub fn split_list(value: &str) -> Result<Vec<&str>, &'static str> {
    let mut entries = Vec::new();
    let (mut quoted, mut escaped, mut angle) = (false, false, false);
    let mut start = 0;
    for (index, ch) in value.char_indices() {
        if quoted {
            match (escaped, ch) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => quoted = false,
                _ => {}
            }
            continue;
        }
        match ch {
            '"' => quoted = true,
            '<' if !angle => angle = true,
            '>' if angle => angle = false,
            ',' if !angle => {
                entries.push(value[start..index].trim());
                start = index + 1;
            }
            _ => {}
        }
    }
    if quoted || angle {
        return Err("unbalanced quotes or angle brackets in a list header");
    }
    entries.push(value[start..].trim());
    if entries.iter().any(|entry| entry.is_empty()) {
        return Err("empty entry in a list header");
    }
    Ok(entries)
}

/// What a 400 needs, read leniently from a request that did not parse: the method (a token
/// opening the request line) and the raw Via, From, To, Call-ID and CSeq lines, none of them
/// holding a control character. Only ever sent back to the peer that wrote them.
fn salvage_identity(head: &str, limits: &Limits) -> Option<RequestIdentity> {
    let mut lines = head.split("\r\n");
    let method = lines.next()?.split(' ').next().filter(|m| is_token(m))?;
    if method.starts_with("SIP/") {
        return None;
    }
    let (mut vias, mut from, mut to, mut call_id, mut cseq) = (Vec::new(), None, None, None, None);
    for line in lines.take(limits.max_headers) {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if value.is_empty()
            || value.len() > limits.max_line_bytes
            || value.chars().any(|c| c.is_control() && c != '\t')
        {
            continue;
        }
        match HeaderName::parse(name.trim()) {
            HeaderName::Via => vias.push(value.to_owned()),
            HeaderName::From => from = from.or(Some(value.to_owned())),
            HeaderName::To => to = to.or(Some(value.to_owned())),
            HeaderName::CallId => call_id = call_id.or(Some(value.to_owned())),
            HeaderName::CSeq => cseq = cseq.or(Some(value.to_owned())),
            _ => {}
        }
    }
    if vias.is_empty() {
        return None;
    }
    Some(RequestIdentity {
        method: method.to_owned(),
        vias,
        from: from?,
        to: to?,
        call_id: call_id?,
        cseq: cseq?,
    })
}

/// `*` or a list of name-addr / addr-spec entries.
fn valid_contact(value: &str) -> bool {
    value == "*"
        || split_list(value).is_ok_and(|entries| {
            entries
                .iter()
                .all(|entry| super::uri::NameAddr::parse(entry).is_some())
        })
}

/// A decimal number of at most `max`.
fn parse_number(text: &str, max: u64) -> Option<u64> {
    if text.is_empty() || text.len() > 10 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse::<u64>().ok().filter(|n| *n <= max)
}

/// The parts of a CSeq value: sequence number and method.
pub fn parse_cseq(value: &str) -> Option<(u32, &str)> {
    let mut parts = value.split([' ', '\t']).filter(|part| !part.is_empty());
    let number = parse_number(parts.next()?, u64::from(u32::MAX >> 1))?;
    let method = parts.next()?;
    if parts.next().is_some() || !is_token(method) {
        return None;
    }
    Some((number as u32, method))
}

impl Message {
    /// Parses one complete message: on a stream, the bytes the [`super::Framer`] cut.
    pub fn parse(bytes: &[u8], limits: &Limits) -> Result<Message, ParseError> {
        if bytes.len() > limits.max_message_bytes {
            return Err(ParseError {
                status: 513,
                ..ParseError::new("Message Too Large")
            });
        }
        let Some(head_end) = find(bytes, b"\r\n\r\n") else {
            return Err(ParseError::new("Bad Request: no end of headers"));
        };
        let head = &bytes[..head_end];
        let body = &bytes[head_end + 4..];
        if head.contains(&0) {
            return Err(ParseError::new("Bad Request: NUL in the header section"));
        }
        let Ok(head) = std::str::from_utf8(head) else {
            return Err(ParseError::new("Bad Request: header section is not UTF-8"));
        };
        let mut lines = head.split("\r\n");
        let start_line = lines.next().unwrap_or_default();
        if start_line.len() > limits.max_line_bytes {
            return Err(ParseError::new("Bad Request: start line too long"));
        }
        let parsed = parse_start_line(start_line).and_then(|start| {
            let headers = parse_headers(lines, limits)?;
            Message {
                start,
                headers,
                body: body.to_vec(),
            }
            .validate()
        });
        parsed.map_err(|mut error| {
            if error.request.is_none() && head.len() <= limits.max_message_bytes {
                error.request = salvage_identity(head, limits).map(Box::new);
            }
            error
        })
    }

    /// Checks what the proxy relies on; a request whose identifying headers parsed gets the
    /// error with them, so it can be answered.
    fn validate(self) -> Result<Message, ParseError> {
        let identity = self.identity();
        let with_identity = |mut error: ParseError| {
            error.request = identity.clone().map(Box::new);
            error
        };
        let mut content_length = None;
        for header in &self.headers {
            let value = header.value.as_str();
            match header.name {
                HeaderName::ContentLength => {
                    let Some(length) = parse_number(value, u64::from(u32::MAX)) else {
                        return Err(with_identity(ParseError::new(
                            "Bad Request: Content-Length",
                        )));
                    };
                    if content_length.replace(length).is_some_and(|l| l != length) {
                        return Err(with_identity(ParseError::new(
                            "Bad Request: conflicting Content-Length",
                        )));
                    }
                }
                HeaderName::MaxForwards if parse_number(value, 255).is_none() => {
                    return Err(with_identity(ParseError::new("Bad Request: Max-Forwards")));
                }
                HeaderName::Expires if parse_number(value, u64::from(u32::MAX)).is_none() => {
                    return Err(with_identity(ParseError::new("Bad Request: Expires")));
                }
                HeaderName::Via if super::via::Via::parse(value).is_none() => {
                    return Err(with_identity(ParseError::new("Bad Request: Via")));
                }
                HeaderName::Contact if !valid_contact(value) => {
                    return Err(with_identity(ParseError::new("Bad Request: Contact")));
                }
                _ => {}
            }
        }
        if let Some(length) = content_length
            && length as usize != self.body.len()
        {
            return Err(with_identity(ParseError::new(
                "Bad Request: Content-Length does not match the body",
            )));
        }
        if content_length.is_none() && !self.body.is_empty() {
            return Err(with_identity(ParseError::new(
                "Bad Request: body without Content-Length",
            )));
        }
        for (name, what) in [
            (HeaderName::Via, "Bad Request: missing Via"),
            (HeaderName::From, "Bad Request: missing From"),
            (HeaderName::To, "Bad Request: missing To"),
            (HeaderName::CallId, "Bad Request: missing Call-ID"),
            (HeaderName::CSeq, "Bad Request: missing CSeq"),
        ] {
            let count = self.headers.iter().filter(|h| h.name == name).count();
            if count == 0 || (count > 1 && name != HeaderName::Via) {
                let reason = if count == 0 {
                    what
                } else {
                    "Bad Request: repeated header"
                };
                return Err(with_identity(ParseError::new(reason)));
            }
        }
        let cseq = self.header(&HeaderName::CSeq).unwrap_or_default();
        let Some((_, cseq_method)) = parse_cseq(cseq) else {
            return Err(ParseError::new("Bad Request: CSeq"));
        };
        if let StartLine::Request { method, .. } = &self.start
            && method != cseq_method
            && !(method == "ACK" && cseq_method == "INVITE")
        {
            return Err(with_identity(ParseError::new(
                "Bad Request: CSeq method does not match the request",
            )));
        }
        for name in [HeaderName::From, HeaderName::To] {
            let value = self.header(&name).unwrap_or_default();
            if super::uri::NameAddr::parse(value).is_none() {
                return Err(with_identity(ParseError::new(match name {
                    HeaderName::From => "Bad Request: From",
                    _ => "Bad Request: To",
                })));
            }
        }
        Ok(self)
    }

    /// What a response to this request needs; `None` for a response.
    pub fn identity(&self) -> Option<RequestIdentity> {
        let StartLine::Request { method, .. } = &self.start else {
            return None;
        };
        let vias: Vec<String> = self
            .header_values(&HeaderName::Via)
            .map(str::to_owned)
            .collect();
        let cseq = self.header(&HeaderName::CSeq)?;
        parse_cseq(cseq)?;
        // A broken Via is still copied into the answer: on a stream the response goes back on
        // the connection, and the sender gets only its own (control-free) text back.
        if vias.is_empty() {
            return None;
        }
        Some(RequestIdentity {
            method: method.clone(),
            vias,
            from: self.header(&HeaderName::From)?.to_owned(),
            to: self.header(&HeaderName::To)?.to_owned(),
            call_id: self.header(&HeaderName::CallId)?.to_owned(),
            cseq: cseq.to_owned(),
        })
    }

    /// The first value of a header.
    pub fn header(&self, name: &HeaderName) -> Option<&str> {
        self.headers
            .iter()
            .find(|header| header.name.same(name))
            .map(|header| header.value.as_str())
    }

    pub fn header_values<'a>(&'a self, name: &'a HeaderName) -> impl Iterator<Item = &'a str> {
        self.headers
            .iter()
            .filter(move |header| header.name.same(name))
            .map(|header| header.value.as_str())
    }

    pub fn remove_headers(&mut self, name: &HeaderName) {
        self.headers.retain(|header| !header.name.same(name));
    }

    /// Inserts before the first header of the same name (or at the top).
    pub fn push_front(&mut self, name: HeaderName, value: String) {
        let at = self
            .headers
            .iter()
            .position(|header| header.name.same(&name))
            .unwrap_or(0);
        self.headers.insert(at, Header { name, value });
    }

    /// Appends after the last header (before the body).
    pub fn push_back(&mut self, name: HeaderName, value: String) {
        self.headers.push(Header { name, value });
    }

    /// Removes and returns the first header of that name.
    pub fn pop_front(&mut self, name: &HeaderName) -> Option<String> {
        let at = self
            .headers
            .iter()
            .position(|header| header.name.same(name))?;
        Some(self.headers.remove(at).value)
    }

    pub fn method(&self) -> Option<&str> {
        match &self.start {
            StartLine::Request { method, .. } => Some(method),
            StartLine::Response { .. } => None,
        }
    }

    /// The method a response answers (from CSeq), or the request's own.
    pub fn cseq_method(&self) -> &str {
        self.header(&HeaderName::CSeq)
            .and_then(parse_cseq)
            .map(|(_, method)| method)
            .unwrap_or_default()
    }

    /// The message as sent on the wire. Content-Length always states the body's length.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut text = String::with_capacity(512 + self.headers.len() * 64);
        match &self.start {
            StartLine::Request { method, uri } => {
                let _ = write!(text, "{method} {uri} SIP/2.0\r\n");
            }
            StartLine::Response { status, reason } => {
                let _ = write!(text, "SIP/2.0 {status} {reason}\r\n");
            }
        }
        for header in &self.headers {
            if header.name != HeaderName::ContentLength {
                let _ = write!(text, "{}: {}\r\n", header.name.as_str(), header.value);
            }
        }
        let _ = write!(text, "Content-Length: {}\r\n\r\n", self.body.len());
        let mut bytes = text.into_bytes();
        bytes.extend_from_slice(&self.body);
        bytes
    }
}

pub(super) fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}

fn parse_start_line(line: &str) -> Result<StartLine, ParseError> {
    if let Some(rest) = line.strip_prefix("SIP/") {
        let Some(rest) = rest.strip_prefix("2.0 ") else {
            return Err(ParseError::new("Bad Request: not SIP/2.0"));
        };
        let (code, reason) = rest.split_once(' ').unwrap_or((rest, ""));
        let status = parse_number(code, 699)
            .filter(|code| {
                *code >= 100
                    && rest
                        .as_bytes()
                        .get(..3)
                        .is_some_and(|d| d.iter().all(u8::is_ascii_digit))
            })
            .ok_or(ParseError::new("Bad Request: status code"))?;
        if reason.chars().any(char::is_control)
            && reason.contains(|c: char| c != '\t' && c.is_control())
        {
            return Err(ParseError::new("Bad Request: reason phrase"));
        }
        return Ok(StartLine::Response {
            status: status as u16,
            reason: reason.to_owned(),
        });
    }
    let mut parts = line.split(' ');
    let (Some(method), Some(uri), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(ParseError::new("Bad Request: request line"));
    };
    if !is_token(method) {
        return Err(ParseError::new("Bad Request: method"));
    }
    if version != "SIP/2.0" {
        let status = if version.starts_with("SIP/") {
            505
        } else {
            400
        };
        return Err(ParseError {
            status,
            ..ParseError::new(if status == 505 {
                "Version Not Supported"
            } else {
                "Bad Request: request line"
            })
        });
    }
    if uri.is_empty()
        || uri
            .bytes()
            .any(|b| b.is_ascii_control() || b == b'<' || b == b'>')
    {
        return Err(ParseError::new("Bad Request: Request-URI"));
    }
    let Some((scheme, _)) = uri.split_once(':') else {
        return Err(ParseError::new("Bad Request: Request-URI"));
    };
    if scheme.eq_ignore_ascii_case("sip") || scheme.eq_ignore_ascii_case("sips") {
        // Headers (`?...`) are not allowed in a Request-URI (RFC 3261 section 19.1.1).
        if uri.contains('?') || super::uri::SipUri::parse(uri).is_none() {
            return Err(ParseError::new("Bad Request: Request-URI"));
        }
    } else if !scheme
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b))
    {
        return Err(ParseError::new("Bad Request: Request-URI"));
    }
    Ok(StartLine::Request {
        method: method.to_owned(),
        uri: uri.to_owned(),
    })
}

fn parse_headers<'a>(
    lines: impl Iterator<Item = &'a str>,
    limits: &Limits,
) -> Result<Vec<Header>, ParseError> {
    // Header lines with their continuation lines (RFC 3261 section 7.3.1) joined by one SP.
    let mut unfolded: Vec<String> = Vec::new();
    for line in lines {
        if line.contains('\r') || line.contains('\n') {
            return Err(ParseError::new("Bad Request: bare CR or LF in a header"));
        }
        if line.starts_with([' ', '\t']) {
            let Some(last) = unfolded.last_mut() else {
                return Err(ParseError::new("Bad Request: continuation line first"));
            };
            last.push(' ');
            last.push_str(line.trim_start_matches([' ', '\t']));
        } else {
            unfolded.push(line.to_owned());
        }
        if unfolded
            .last()
            .is_some_and(|l| l.len() > limits.max_line_bytes)
        {
            return Err(ParseError::new("Bad Request: header line too long"));
        }
        if unfolded.len() > limits.max_headers {
            return Err(ParseError::new("Bad Request: too many headers"));
        }
    }
    let mut headers = Vec::with_capacity(unfolded.len());
    for line in &unfolded {
        let Some((name, value)) = line.split_once(':') else {
            return Err(ParseError::new("Bad Request: header without a colon"));
        };
        let name = name.trim_end_matches([' ', '\t']);
        if !is_token(name) {
            return Err(ParseError::new("Bad Request: header name"));
        }
        if value.chars().any(|c| c.is_control() && c != '\t') {
            return Err(ParseError::new(
                "Bad Request: control character in a header",
            ));
        }
        let name = HeaderName::parse(name);
        let value = value.trim_matches([' ', '\t']);
        if name.is_list() {
            for entry in split_list(value).map_err(ParseError::new)? {
                headers.push(Header {
                    name: name.clone(),
                    value: entry.to_owned(),
                });
            }
        } else {
            headers.push(Header {
                name,
                value: value.to_owned(),
            });
        }
        if headers.len() > limits.max_headers {
            return Err(ParseError::new("Bad Request: too many headers"));
        }
    }
    Ok(headers)
}

/// A response to a request that the edge answers itself (RFC 3261 section 8.2.6): its Vias,
/// From, To (with a tag when it has none), Call-ID and CSeq.
pub fn response_to(request: &RequestIdentity, status: u16, reason: &str, to_tag: &str) -> Message {
    let mut headers: Vec<Header> = request
        .vias
        .iter()
        .map(|via| Header {
            name: HeaderName::Via,
            value: via.clone(),
        })
        .collect();
    let to = if status > 100 && !request.to.to_ascii_lowercase().contains(";tag=") {
        format!("{};tag={to_tag}", request.to)
    } else {
        request.to.clone()
    };
    for (name, value) in [
        (HeaderName::From, request.from.clone()),
        (HeaderName::To, to),
        (HeaderName::CallId, request.call_id.clone()),
        (HeaderName::CSeq, request.cseq.clone()),
    ] {
        headers.push(Header { name, value });
    }
    Message {
        start: StartLine::Response {
            status,
            reason: reason.to_owned(),
        },
        headers,
        body: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const INVITE: &str = "INVITE sip:bob@corp.example SIP/2.0\r\n\
        Via: SIP/2.0/TLS client.example.net:5061;branch=z9hG4bK776asdhds\r\n\
        Max-Forwards: 70\r\n\
        To: Bob <sip:bob@corp.example>\r\n\
        From: Alice <sip:alice@corp.example>;tag=1928301774\r\n\
        Call-ID: a84b4c76e66710@pc33.example.net\r\n\
        CSeq: 314159 INVITE\r\n\
        Contact: <sips:alice@pc33.example.net>\r\n\
        Content-Type: application/sdp\r\n\
        Content-Length: 4\r\n\r\nv=0\n";

    #[test]
    fn parses_and_round_trips_a_request() {
        let message = Message::parse(INVITE.as_bytes(), &Limits::default()).unwrap();
        assert_eq!(message.method(), Some("INVITE"));
        assert_eq!(message.body, b"v=0\n");
        let again = Message::parse(&message.to_bytes(), &Limits::default()).unwrap();
        assert_eq!(again, message);
    }

    #[test]
    fn unfolds_continuation_lines_and_compact_names() {
        let text = INVITE
            .replace(
                "Max-Forwards: 70\r\n",
                "Subject: a\r\n  folded\r\n\tline\r\n",
            )
            .replace("Call-ID:", "i:");
        let message = Message::parse(text.as_bytes(), &Limits::default()).unwrap();
        assert_eq!(
            message.header(&HeaderName::Other("subject".into())),
            Some("a folded line")
        );
        assert_eq!(
            message.header(&HeaderName::CallId),
            Some("a84b4c76e66710@pc33.example.net")
        );
    }

    #[test]
    fn splits_via_lists() {
        let text = INVITE.replace(
            "Via: SIP/2.0/TLS client.example.net:5061;branch=z9hG4bK776asdhds",
            "Via: SIP/2.0/TLS a.example;branch=z9hG4bK1, SIP/2.0/TLS b.example;branch=z9hG4bK2",
        );
        let message = Message::parse(text.as_bytes(), &Limits::default()).unwrap();
        assert_eq!(message.header_values(&HeaderName::Via).count(), 2);
    }

    #[test]
    fn refuses_what_an_edge_must_not_pass() {
        let limits = Limits::default();
        let cases = [
            (
                INVITE.replace("Content-Length: 4", "Content-Length: 5"),
                "match the body",
            ),
            (
                INVITE.replace("Content-Length: 4", "Content-Length: -4"),
                "Content-Length",
            ),
            (
                INVITE.replace("CSeq: 314159 INVITE", "CSeq: 314159 BYE"),
                "CSeq method",
            ),
            (
                INVITE.replace("Max-Forwards: 70", "Max-Forwards: 300"),
                "Max-Forwards",
            ),
            (INVITE.replace("Call-ID: a84b", "Call-ID: \0a84b"), "NUL"),
            (
                INVITE.replace("Max-Forwards: 70\r\n", "Max-Forwards: 70\nX: y\r\n"),
                "bare CR or LF",
            ),
            (INVITE.replace("SIP/2.0\r\n", "SIP/7.0\r\n"), "Version"),
            (
                INVITE.replace("To: Bob <sip:bob@corp.example>\r\n", ""),
                "missing To",
            ),
            (INVITE.replace("Via: SIP/2.0/TLS", "Via: SIP/2.0/"), "Via"),
        ];
        for (text, expected) in cases {
            let error = Message::parse(text.as_bytes(), &limits).unwrap_err();
            assert!(error.reason.contains(expected), "{expected}: got {error:?}");
        }
        let mut many = INVITE.to_owned();
        for n in 0..200 {
            many = many.replacen("Max-Forwards", &format!("X-{n}: y\r\nMax-Forwards"), 1);
        }
        assert!(
            Message::parse(many.as_bytes(), &limits)
                .unwrap_err()
                .reason
                .contains("too many")
        );
        let long = INVITE.replace("Max-Forwards: 70", &format!("X: {}", "a".repeat(9000)));
        assert!(
            Message::parse(long.as_bytes(), &limits)
                .unwrap_err()
                .reason
                .contains("too long")
        );
    }

    #[test]
    fn a_rejected_request_can_still_be_answered() {
        let text = INVITE.replace("Content-Length: 4", "Content-Length: 9");
        let error = Message::parse(text.as_bytes(), &Limits::default()).unwrap_err();
        let request = error.request.expect("identity");
        let response = response_to(&request, 400, error.reason, "edge1");
        let bytes = response.to_bytes();
        let parsed = Message::parse(&bytes, &Limits::default()).unwrap();
        assert!(
            parsed
                .header(&HeaderName::To)
                .unwrap()
                .ends_with(";tag=edge1")
        );
        assert_eq!(parsed.header(&HeaderName::CSeq), Some("314159 INVITE"));
    }
}
