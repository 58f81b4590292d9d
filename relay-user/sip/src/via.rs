//! One Via entry (RFC 3261 section 20.42): `SIP/2.0/TLS host:port;branch=...`.

use super::uri::{find_param, parse_host_port};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Via {
    /// Upper case: `TLS`, `TCP`, `UDP`, ...
    pub transport: String,
    pub host: String,
    pub port: Option<u16>,
    /// Parameters in order, names lower case.
    pub params: Vec<(String, Option<String>)>,
}

impl Via {
    pub fn parse(value: &str) -> Option<Via> {
        // LWS is allowed around the slashes of the protocol (RFC 4475 section 3.1.1.1).
        let mut rest = value.trim_start();
        let mut protocol = Vec::with_capacity(3);
        for index in 0..3 {
            let end = if index < 2 {
                rest.find('/')?
            } else {
                rest.find([' ', '\t'])?
            };
            protocol.push(rest[..end].trim());
            rest = rest[end..].trim_start_matches('/').trim_start();
            if index == 1 {
                rest = rest.trim_start();
            }
        }
        if !protocol[0].eq_ignore_ascii_case("SIP")
            || protocol[1] != "2.0"
            || protocol[2].is_empty()
            || !protocol[2]
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return None;
        }
        let mut pieces = rest.split(';');
        let sent_by: String = pieces
            .next()?
            .chars()
            .filter(|c| !c.is_whitespace())
            .collect();
        let (host, port) = parse_host_port(&sent_by)?;
        let mut params = Vec::new();
        for piece in pieces {
            let piece = piece.trim();
            let (name, value) = match piece.split_once('=') {
                Some((name, value)) => (name.trim(), Some(value.trim().to_owned())),
                None => (piece, None),
            };
            if name.is_empty()
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-.!%*_+`'~".contains(&b))
            {
                return None;
            }
            params.push((name.to_ascii_lowercase(), value));
        }
        Some(Via {
            transport: protocol[2].to_ascii_uppercase(),
            host,
            port,
            params,
        })
    }

    pub fn param(&self, name: &str) -> Option<Option<&str>> {
        find_param(&self.params, name)
    }

    pub fn branch(&self) -> Option<&str> {
        self.param("branch").flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_vias() {
        let via = Via::parse("SIP / 2.0 / TLS  edge.example:5061 ;branch=z9hG4bKa;rport").unwrap();
        assert_eq!(via.transport, "TLS");
        assert_eq!((via.host.as_str(), via.port), ("edge.example", Some(5061)));
        assert_eq!(via.branch(), Some("z9hG4bKa"));
        assert_eq!(via.param("rport"), Some(None));
        for bad in [
            "SIP/2.0/ host",
            "SIP/3.0/TLS host",
            "SIP/2.0/TLS",
            "SIP/2.0/TLS host;=x",
            "SIP/2.0/TLS ho_st",
        ] {
            assert!(Via::parse(bad).is_none(), "{bad}");
        }
    }
}
