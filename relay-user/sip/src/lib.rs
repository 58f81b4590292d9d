//! The Access Edge: SIP over TLS between the internet and the enterprise (RFC 3261), sans-IO.
//!
//! - [`message`]: the strict parser (limits, Content-Length, no CR/LF/NUL in headers) and
//!   serializer; [`framer`]: messages and RFC 5626 keep-alives cut from a TLS stream;
//!   [`uri`], [`via`]: the parts of headers routing reads.
//! - [`proxy`]: the stateless routing core (policy, Via/Record-Route/Path, topology hiding,
//!   trust header), with its state sealed into its own headers by [`token`].
//! - [`policy`]: access methods and federation; [`guard`]: per-source rate limits, bans and
//!   connection caps.
//!
//! The tokio shell around them is the agent's `server::sip` (relay-user).

pub mod framer;
pub mod guard;
pub mod message;
pub mod policy;
pub mod proxy;
pub mod token;
pub mod uri;
pub mod via;

pub use framer::{Frame, Framer};
pub use message::{HeaderName, Limits, Message, ParseError, StartLine};
