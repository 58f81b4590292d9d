//! SIP URIs and name-addr values (RFC 3261 sections 19.1 and 20.10), as far as routing needs:
//! the host a URI names, its port and parameters.

/// A `sip:` or `sips:` URI.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SipUri {
    pub secure: bool,
    pub user: Option<String>,
    /// Lower case; IPv6 references keep their brackets.
    pub host: String,
    pub port: Option<u16>,
    /// URI parameters in order, names lower case.
    pub params: Vec<(String, Option<String>)>,
}

fn valid_host(host: &str) -> bool {
    if let Some(inner) = host.strip_prefix('[') {
        return inner
            .strip_suffix(']')
            .is_some_and(|v6| v6.parse::<std::net::Ipv6Addr>().is_ok());
    }
    !host.is_empty()
        && host.len() <= 253
        && host.split('.').enumerate().all(|(index, label)| {
            // A fully qualified name may end with a dot.
            (label.is_empty() && index > 0 && host.ends_with('.'))
                || (!label.is_empty()
                    && label.len() <= 63
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                    && !label.starts_with('-')
                    && !label.ends_with('-'))
        })
}

/// A parameter by its lower-case name: `Some(None)` when present without a value.
pub fn find_param<'a>(
    params: &'a [(String, Option<String>)],
    name: &str,
) -> Option<Option<&'a str>> {
    params
        .iter()
        .find(|(own, _)| own == name)
        .map(|(_, value)| value.as_deref())
}

/// Splits `host[:port]`.
pub fn parse_host_port(text: &str) -> Option<(String, Option<u16>)> {
    let (host, port) = if text.starts_with('[') {
        let end = text.find(']')?;
        let (host, rest) = text.split_at(end + 1);
        match rest.strip_prefix(':') {
            Some(port) => (host, Some(port)),
            None if rest.is_empty() => (host, None),
            None => return None,
        }
    } else {
        match text.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (text, None),
        }
    };
    let port = match port {
        Some(port)
            if port.is_empty() || port.len() > 5 || !port.bytes().all(|b| b.is_ascii_digit()) =>
        {
            return None;
        }
        Some(port) => Some(port.parse::<u16>().ok().filter(|p| *p != 0)?),
        None => None,
    };
    valid_host(host).then(|| (host.to_ascii_lowercase(), port))
}

impl SipUri {
    pub fn parse(text: &str) -> Option<SipUri> {
        let (scheme, rest) = text.split_once(':')?;
        let secure = if scheme.eq_ignore_ascii_case("sips") {
            true
        } else if scheme.eq_ignore_ascii_case("sip") {
            false
        } else {
            return None;
        };
        // Headers (`?...`) are dropped by routing decisions but kept in the text.
        let rest = rest.split('?').next().unwrap_or_default();
        let (user, host_part) = match rest.rsplit_once('@') {
            Some((user, host)) if !user.is_empty() => (Some(user.to_owned()), host),
            Some(_) => return None,
            None => (None, rest),
        };
        let mut pieces = host_part.split(';');
        let (host, port) = parse_host_port(pieces.next()?)?;
        let mut params = Vec::new();
        for piece in pieces {
            if piece.is_empty() {
                return None;
            }
            let (name, value) = match piece.split_once('=') {
                Some((name, value)) => (name, Some(value.to_owned())),
                None => (piece, None),
            };
            if name.is_empty() {
                return None;
            }
            params.push((name.to_ascii_lowercase(), value));
        }
        if user
            .as_deref()
            .is_some_and(|user| user.bytes().any(|b| b.is_ascii_control() || b == b' '))
        {
            return None;
        }
        Some(SipUri {
            secure,
            user,
            host,
            port,
            params,
        })
    }

    pub fn param(&self, name: &str) -> Option<Option<&str>> {
        find_param(&self.params, name)
    }

    /// The host without a trailing dot, for comparing domains.
    pub fn domain(&self) -> &str {
        self.host.trim_end_matches('.')
    }
}

/// A From/To/Contact/Route value: the URI, and the header parameters after it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NameAddr<'a> {
    /// Everything before the URI (display name and `<`), kept for rewriting.
    pub display: &'a str,
    pub uri: &'a str,
    /// Header parameters, starting with `;` (or empty).
    pub params: &'a str,
    pub bracketed: bool,
}

impl<'a> NameAddr<'a> {
    pub fn parse(value: &'a str) -> Option<NameAddr<'a>> {
        let value = value.trim();
        if value == "*" {
            return None;
        }
        // A quoted display name may itself contain '<'.
        let search_from = if value.starts_with('"') {
            let mut escaped = false;
            let mut end = None;
            for (index, ch) in value.char_indices().skip(1) {
                match (escaped, ch) {
                    (true, _) => escaped = false,
                    (false, '\\') => escaped = true,
                    (false, '"') => {
                        end = Some(index + 1);
                        break;
                    }
                    _ => {}
                }
            }
            end?
        } else {
            0
        };
        if let Some(open) = value[search_from..].find('<').map(|i| i + search_from) {
            let close = value[open..].find('>')? + open;
            let uri = &value[open + 1..close];
            let params = value[close + 1..].trim_start();
            if !(params.is_empty() || params.starts_with(';')) || !uri_like(uri) {
                return None;
            }
            return Some(NameAddr {
                display: &value[..open],
                uri,
                params,
                bracketed: true,
            });
        }
        if search_from != 0 {
            return None;
        }
        // addr-spec: parameters after the URI belong to the header (RFC 3261 section 20).
        let (uri, params) = match value.find(';') {
            Some(at) => value.split_at(at),
            None => (value, ""),
        };
        let uri = uri.trim_end();
        // An addr-spec holding `?` (or `,`, `;`) must be in angle brackets (RFC 3261 section 20).
        if !uri_like(uri) || uri.contains([' ', '\t', '?', ',']) {
            return None;
        }
        Some(NameAddr {
            display: "",
            uri,
            params,
            bracketed: false,
        })
    }

    /// The header parameter `name` (e.g. `tag`).
    pub fn param(&self, name: &str) -> Option<&'a str> {
        self.params
            .split(';')
            .filter_map(|piece| {
                let (key, value) = piece.split_once('=').unwrap_or((piece, ""));
                key.trim()
                    .eq_ignore_ascii_case(name)
                    .then_some(value.trim())
            })
            .next()
    }

    /// The same value with another URI.
    pub fn with_uri(&self, uri: &str) -> String {
        if self.bracketed {
            format!("{}<{uri}>{}", self.display, self.params)
        } else {
            format!("<{uri}>{}", self.params)
        }
    }
}

fn uri_like(uri: &str) -> bool {
    match uri.split_once(':') {
        Some((scheme, rest)) => {
            !scheme.is_empty()
                && scheme
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b))
                && !rest.is_empty()
                && (!(scheme.eq_ignore_ascii_case("sip") || scheme.eq_ignore_ascii_case("sips"))
                    || SipUri::parse(uri).is_some())
        }
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sip_uris() {
        let uri = SipUri::parse("sips:Alice@Corp.Example:5061;transport=tls;lr").unwrap();
        assert_eq!(uri.user.as_deref(), Some("Alice"));
        assert_eq!(uri.host, "corp.example");
        assert_eq!(uri.port, Some(5061));
        assert_eq!(uri.param("lr"), Some(None));
        assert_eq!(
            SipUri::parse("sip:[2001:db8::1]:5060").unwrap().host,
            "[2001:db8::1]"
        );
        for bad in [
            "sip:",
            "sip:@host",
            "sip:host:0",
            "sip:host:99999",
            "sip:ho st",
            "sip:-a.example",
            "http://x",
        ] {
            assert!(SipUri::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn parses_name_addr_values() {
        let value = "\"Bob <the boss>\" <sip:bob@corp.example>;tag=a1";
        let parsed = NameAddr::parse(value).unwrap();
        assert_eq!(parsed.uri, "sip:bob@corp.example");
        assert_eq!(parsed.param("tag"), Some("a1"));
        assert_eq!(
            parsed.with_uri("sip:x@y"),
            "\"Bob <the boss>\" <sip:x@y>;tag=a1"
        );
        let bare = NameAddr::parse("sip:bob@corp.example;tag=7").unwrap();
        assert_eq!(
            (bare.uri, bare.param("tag")),
            ("sip:bob@corp.example", Some("7"))
        );
        assert!(NameAddr::parse("<sip:bob@corp.example").is_none());
        assert!(NameAddr::parse("Bob sip:bob@corp.example").is_none());
    }
}
