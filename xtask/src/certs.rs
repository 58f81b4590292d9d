//! `cargo xtask certs`: a development PKI for the control service's mutual TLS: a CA, the
//! control server's certificate, and one client certificate per role (front-end, relay
//! agent, operator), plus the configurations that use them: the control service's (its role
//! allow lists name exactly those certificates' SANs), the agent's (the embedded default
//! with a `[control]` link), and a client file per role for `rampart-control call`.
//!
//! Idempotent: files that exist are kept (unless `--force`), so re-running never invalidates
//! certificates already handed to running processes. New leaves are signed with the existing
//! CA key; if the CA itself is new, every leaf is reissued, since leaves of an older CA would
//! no longer verify.

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result, bail};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};

/// The development control configuration; `cargo xtask certs` writes it as `control.toml`.
const CONTROL_CONFIG: &str = include_str!("../../control/config/development.toml");
/// The agent's embedded default; `rampart.toml` is this with a `[control]` section.
const AGENT_DEFAULT: &str = include_str!("../../relay-user/config/default.toml");
/// Where the development control configuration listens.
pub const CONTROL_ENDPOINT: &str = "127.0.0.1:7443";
/// The agent configuration of the all-in-one, beside the certificates.
pub const AGENT_CONFIG: &str = "rampart.toml";

const CA_NAME: &str = "Rampart development CA";
/// The name the control service is reached by (`tls.server_name` of the configuration).
const SERVER_NAME: &str = "control.rampart.test";
/// Certificates for development last this long; long enough not to expire mid-project,
/// short enough that a leaked one does not live forever.
const VALID_DAYS: i64 = 825;

/// One leaf certificate: file stem, SANs, and whether it is a server certificate.
struct Leaf {
    stem: &'static str,
    sans: &'static [San],
    server: bool,
}

enum San {
    Dns(&'static str),
    Ip(&'static str),
    Uri(&'static str),
}

/// The SANs below are the ones `control/config/development.toml` allows per role.
const LEAVES: &[Leaf] = &[
    Leaf {
        stem: "server",
        sans: &[
            San::Dns(SERVER_NAME),
            San::Dns("localhost"),
            San::Ip("127.0.0.1"),
            San::Ip("::1"),
        ],
        server: true,
    },
    Leaf {
        stem: "front-end",
        sans: &[San::Dns("front-end.rampart.test")],
        server: false,
    },
    Leaf {
        stem: "agent",
        sans: &[San::Dns("edge-1.agents.rampart.test")],
        server: false,
    },
    Leaf {
        stem: "operator",
        sans: &[San::Uri("spiffe://rampart.test/operator")],
        server: false,
    },
    // The Web Conferencing Edge: its listeners (outside: localhost; inside: its internal
    // name), and the reference conferencing server's client certificate.
    Leaf {
        stem: "conferencing-edge",
        sans: &[
            San::Dns("localhost"),
            San::Dns(CONFERENCING_EDGE_NAME),
            San::Ip("127.0.0.1"),
        ],
        server: true,
    },
    Leaf {
        stem: "conference-server",
        sans: &[San::Dns("conference-server.rampart.test")],
        server: false,
    },
];

/// The name on the edge's internal (8057) certificate.
pub const CONFERENCING_EDGE_NAME: &str = "edge.conferencing.rampart.test";
/// The all-in-one's Web Conferencing Edge: participants (TLS) and internal servers (mTLS).
pub const CONFERENCING_EXTERNAL: &str = "127.0.0.1:8443";
pub const CONFERENCING_INTERNAL: &str = "127.0.0.1:8057";

/// What to do with each file.
pub struct Options {
    pub out: PathBuf,
    pub force: bool,
}

pub fn run(options: &Options) -> Result<()> {
    let out = &options.out;
    fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let today = today()?;

    let ca_pem = out.join("ca.pem");
    let ca_key_path = out.join("ca.key");
    let (ca, ca_key, ca_is_new) = if !options.force && (ca_pem.exists() || ca_key_path.exists()) {
        if !(ca_pem.exists() && ca_key_path.exists()) {
            bail!(
                "{} has only one of ca.pem and ca.key; restore the other, or run with \
                     --force to make a new CA (every certificate is then reissued)",
                out.display()
            );
        }
        let key_pem = fs::read_to_string(&ca_key_path)
            .with_context(|| format!("reading {}", ca_key_path.display()))?;
        let key = KeyPair::from_pem(&key_pem)
            .with_context(|| format!("{} is not a PEM private key", ca_key_path.display()))?;
        // Issuing needs the CA as an rcgen certificate: rebuild it from the same name and
        // key. Leaves it signs verify against the ca.pem on disk, whose subject and key
        // are the same.
        let ca = ca_params(today).self_signed(&key)?;
        (ca, key, false)
    } else {
        let key = KeyPair::generate()?;
        let ca = ca_params(today).self_signed(&key)?;
        write(&ca_pem, ca.pem().as_bytes(), false)?;
        write(&ca_key_path, key.serialize_pem().as_bytes(), true)?;
        eprintln!("xtask: wrote {} (new CA)", ca_pem.display());
        (ca, key, true)
    };

    for leaf in LEAVES {
        let cert_path = out.join(format!("{}.pem", leaf.stem));
        let key_path = out.join(format!("{}.key", leaf.stem));
        if !options.force && !ca_is_new && cert_path.exists() && key_path.exists() {
            continue;
        }
        let key = KeyPair::generate()?;
        let cert = leaf_params(leaf, today)?.signed_by(&key, &ca, &ca_key)?;
        write(&cert_path, cert.pem().as_bytes(), false)?;
        write(&key_path, key.serialize_pem().as_bytes(), true)?;
        eprintln!("xtask: wrote {}", cert_path.display());
    }

    for (name, contents) in configs() {
        let path = out.join(name);
        if options.force || !path.exists() {
            write(&path, contents.as_bytes(), false)?;
            eprintln!("xtask: wrote {}", path.display());
        }
    }
    eprintln!(
        "xtask: development certificates and configurations in {} (existing files kept; \
         --force remakes them)",
        out.display()
    );
    Ok(())
}

/// The configuration files that go with the certificates, by file name.
fn configs() -> [(&'static str, String); 4] {
    let client = |stem: &str| {
        format!(
            "# A client file for `rampart-control call --client <this file>`: the certificate\n\
             # below decides the role.\n\
             endpoint = \"{CONTROL_ENDPOINT}\"\n\
             server_name = \"{SERVER_NAME}\"\n\
             ca = \"ca.pem\"\n\
             certificate = \"{stem}.pem\"\n\
             private_key = \"{stem}.key\"\n"
        )
    };
    let agent = format!(
        "{AGENT_DEFAULT}\n\
         # Written by `cargo xtask certs`: the all-in-one's link to its control service.\n\
         [control]\n\
         endpoint = \"https://{CONTROL_ENDPOINT}\"\n\
         server_name = \"{SERVER_NAME}\"\n\
         ca = \"ca.pem\"\n\
         certificate = \"agent.pem\"\n\
         private_key = \"agent.key\"\n\
         agent_id = \"edge-1\"\n\
         \n\
         # The Web Conferencing Edge: participants join on {CONFERENCING_EXTERNAL} (443 in\n\
         # production), internal conferencing servers dial {CONFERENCING_INTERNAL}.\n\
         [conferencing]\n\
         external = \"{CONFERENCING_EXTERNAL}\"\n\
         certificate = \"conferencing-edge.pem\"\n\
         private_key = \"conferencing-edge.key\"\n\
         internal = \"{CONFERENCING_INTERNAL}\"\n\
         internal_certificate = \"conferencing-edge.pem\"\n\
         internal_private_key = \"conferencing-edge.key\"\n\
         internal_client_ca = \"ca.pem\"\n"
    );
    [
        ("control.toml", CONTROL_CONFIG.to_owned()),
        (AGENT_CONFIG, agent),
        ("front-end-client.toml", client("front-end")),
        ("operator-client.toml", client("operator")),
    ]
}

fn ca_params(today: i64) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, CA_NAME);
    params.distinguished_name = name;
    // The development CA issues leaves directly; no intermediates.
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    // cRLSign too, so a development CRL can be made with this CA to try revocation.
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    set_validity(&mut params, today);
    params
}

fn leaf_params(leaf: &Leaf, today: i64) -> Result<CertificateParams> {
    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(
        DnType::CommonName,
        format!("Rampart development {}", leaf.stem),
    );
    params.distinguished_name = name;
    for san in leaf.sans {
        params.subject_alt_names.push(match san {
            San::Dns(dns) => SanType::DnsName((*dns).try_into()?),
            San::Ip(ip) => SanType::IpAddress(ip.parse()?),
            San::Uri(uri) => SanType::URI((*uri).try_into()?),
        });
    }
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![if leaf.server {
        ExtendedKeyUsagePurpose::ServerAuth
    } else {
        ExtendedKeyUsagePurpose::ClientAuth
    }];
    set_validity(&mut params, today);
    Ok(params)
}

/// Days since 1970-01-01, today.
fn today() -> Result<i64> {
    Ok(SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .context("the system clock is before 1970")?
        .as_secs() as i64
        / 86_400)
}

/// From yesterday (so a clock slightly behind does not reject new certificates) to
/// [`VALID_DAYS`] later.
fn set_validity(params: &mut CertificateParams, today: i64) {
    let date = |days: i64| {
        let (year, month, day) = civil_from_days(days);
        rcgen::date_time_ymd(year, month, day)
    };
    params.not_before = date(today - 1);
    params.not_after = date(today + VALID_DAYS);
}

/// The proleptic Gregorian date of a day count since 1970-01-01 (Howard Hinnant's
/// `civil_from_days`).
fn civil_from_days(days: i64) -> (i32, u8, u8) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year as i32, month as u8, day as u8)
}

/// Writes a file whole; private keys are created readable by their owner only.
fn write(path: &Path, contents: &[u8], private: bool) -> Result<()> {
    let mut options = fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    if private {
        options.mode(0o600);
    }
    let mut file = options
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    file.write_all(contents)
        .with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_723), (2024, 1, 1));
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
    }

    #[test]
    fn the_development_config_allows_each_client_certificate_its_role() {
        let allows = |key: &str, entry: &str| {
            CONTROL_CONFIG
                .lines()
                .any(|line| line.starts_with(key) && line.contains(&format!("\"{entry}\"")))
        };
        assert!(allows("front_end", "dns:front-end.rampart.test"));
        // The agent's SAN is one label under the wildcard.
        assert!(allows("relay_agent", "dns:*.agents.rampart.test"));
        assert!(allows("operator", "uri:spiffe://rampart.test/operator"));
        assert!(CONTROL_CONFIG.contains(&format!("server_name = \"{SERVER_NAME}\"")));
        assert!(CONTROL_CONFIG.contains(&format!("listen = \"{CONTROL_ENDPOINT}\"")));
        // The agent's TURN REST secret is the one control issues credentials with.
        let secret = "rampart-development-secret-change-me";
        assert!(AGENT_DEFAULT.contains(&format!("rest_secrets = [\"{secret}\"]")));
        assert!(CONTROL_CONFIG.contains(&format!("rest_secret = \"{secret}\"")));
    }

    #[test]
    fn certs_are_idempotent_unless_forced() {
        let out = std::env::temp_dir().join(format!("rampart-xtask-certs-{}", std::process::id()));
        let _ = fs::remove_dir_all(&out);
        let options = Options {
            out: out.clone(),
            force: false,
        };
        run(&options).unwrap();
        let read = |name: &str| fs::read(out.join(name)).unwrap();
        let (ca, server) = (read("ca.pem"), read("server.pem"));
        use std::os::unix::fs::PermissionsExt as _;
        let mode = fs::metadata(out.join("ca.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "private keys are owner-only");

        // A missing leaf is reissued under the same CA; the others are kept.
        fs::remove_file(out.join("agent.pem")).unwrap();
        run(&options).unwrap();
        assert_eq!(read("ca.pem"), ca);
        assert_eq!(read("server.pem"), server);
        assert!(out.join("agent.pem").exists());

        run(&Options {
            out: out.clone(),
            force: true,
        })
        .unwrap();
        assert_ne!(read("ca.pem"), ca);
        assert_ne!(read("server.pem"), server);
        fs::remove_dir_all(&out).unwrap();
    }
}
