//! The gRPC services. Each is a struct with its dependencies passed in; the role a caller
//! needs is checked per RPC by an interceptor wrapped around the whole service (see
//! [`require`]), so a method added later cannot forget the check.

mod agent;
mod front_end;
mod operator;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use tonic::{Request, Status};

pub use agent::AgentService;
pub use front_end::FrontEndService;
pub use operator::OperatorService;

use crate::identity::{Role, RoleSet, SanName};
use crate::state::State;
use crate::store::StoreError;

/// A caller with a verified client certificate, attached by the server to every request of
/// its connection.
#[derive(Clone, Debug)]
pub struct Caller {
    pub peer: SocketAddr,
    /// The certificate's DNS and URI SANs.
    pub names: Vec<SanName>,
    pub roles: RoleSet,
}

impl Caller {
    /// The certificate's names as one string, for logs and records.
    pub fn identity(&self) -> String {
        if self.names.is_empty() {
            return "(no DNS or URI SAN)".to_owned();
        }
        self.names
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// The request extension the connection's [`Caller`] travels in.
#[derive(Clone, Debug)]
pub struct CallerInfo(pub Arc<Caller>);

/// An interceptor that lets a request through only if its connection's certificate holds
/// `role`.
pub fn require(role: Role) -> impl FnMut(Request<()>) -> Result<Request<()>, Status> + Clone {
    move |request: Request<()>| {
        let Some(CallerInfo(caller)) = request.extensions().get::<CallerInfo>() else {
            // Every connection the server accepts carries one; this is a wiring bug.
            return Err(Status::unauthenticated("no verified client certificate"));
        };
        if caller.roles.contains(role) {
            return Ok(request);
        }
        tracing::warn!(
            peer = %caller.peer,
            identity = %caller.identity(),
            holds = %caller.roles,
            needs = %role,
            "refused: role not allowed for this RPC"
        );
        Err(Status::permission_denied(format!(
            "this RPC needs the {role} role; the client certificate ({}) holds {}",
            caller.identity(),
            caller.roles
        )))
    }
}

/// The caller of a request that passed [`require`].
fn caller<T>(request: &Request<T>) -> Result<Arc<Caller>, Status> {
    request
        .extensions()
        .get::<CallerInfo>()
        .map(|info| info.0.clone())
        .ok_or_else(|| Status::unauthenticated("no verified client certificate"))
}

/// Seconds since the Unix epoch. A clock before 1970 reads as 0, which expires everything
/// rather than nothing.
pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs())
}

/// Runs blocking store work off the async threads and maps its errors to gRPC statuses.
async fn blocking<T, F>(state: &Arc<State>, work: F) -> Result<T, Status>
where
    T: Send + 'static,
    F: FnOnce(&State) -> Result<T, StoreError> + Send + 'static,
{
    let state = state.clone();
    match tokio::task::spawn_blocking(move || work(&state)).await {
        Ok(result) => result.map_err(store_status),
        Err(error) => {
            tracing::error!(%error, "store task failed");
            Err(Status::internal("the control state is unavailable"))
        }
    }
}

fn store_status(error: StoreError) -> Status {
    match error {
        StoreError::ConferenceExists(_) => Status::already_exists(error.to_string()),
        StoreError::ConferenceMissing(_) => Status::not_found(error.to_string()),
        other => {
            // The details (paths, corruption) are for the operator's log, not the caller.
            tracing::error!(error = %other, "control state error");
            Status::internal("the control state is unavailable")
        }
    }
}

fn invalid(field: &str, problem: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("{field}: {problem}"))
}

/// Conference and agent ids: 1 to 128 printable ASCII characters, no spaces, so they are
/// safe in logs, file names and command lines.
fn check_id(field: &str, id: &str) -> Result<(), Status> {
    if id.is_empty() || id.len() > 128 || !id.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(invalid(
            field,
            "must be 1 to 128 printable ASCII characters without spaces",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_checked() {
        assert!(check_id("id", "conf-1@example.com").is_ok());
        for bad in ["", "a b", "é", &"x".repeat(129)] {
            let status = check_id("conference_id", bad).unwrap_err();
            assert_eq!(status.code(), tonic::Code::InvalidArgument);
            assert!(status.message().starts_with("conference_id:"));
        }
    }

    #[test]
    fn require_checks_the_role() {
        let caller = |roles: RoleSet| {
            let mut request = Request::new(());
            request.extensions_mut().insert(CallerInfo(Arc::new(Caller {
                peer: "127.0.0.1:1".parse().unwrap(),
                names: vec![SanName::Dns("fe.example.com".into())],
                roles,
            })));
            request
        };
        let map = crate::identity::RoleMap {
            front_end: crate::identity::AllowList::parse(&["dns:fe.example.com".into()]).unwrap(),
            ..Default::default()
        };
        let front_end = map.roles_of(&[SanName::Dns("fe.example.com".into())]);
        assert!(require(Role::FrontEnd)(caller(front_end)).is_ok());
        let denied = require(Role::Operator)(caller(front_end)).unwrap_err();
        assert_eq!(denied.code(), tonic::Code::PermissionDenied);
        let missing = require(Role::Operator)(Request::new(())).unwrap_err();
        assert_eq!(missing.code(), tonic::Code::Unauthenticated);
    }
}
