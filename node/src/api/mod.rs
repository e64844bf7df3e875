//! The client API (gRPC on --api-listen): node, manager and agent services,
//! plus `grpc.health.v1` and server reflection (v1 and v1alpha).

use tonic::{Request, Status};

mod agent;
mod files;
pub mod json;
mod manager;
pub mod node;

pub use agent::AgentApi;
pub use files::FileApi;
pub use manager::{LogAccess, ManagerApi};
pub use node::NodeApi;

/// The three client services of a node.
pub struct Apis {
    /// Node identity and peers.
    pub node: NodeApi,
    /// Templates and workflows.
    pub manager: ManagerApi,
    /// Job types and jobs.
    pub agent: AgentApi,
    /// Files into and out of the blob store.
    pub files: FileApi,
}

/// Most items one list call returns, whatever `limit` asks for.
pub(crate) const MAX_LIST: usize = 1000;
/// Most bytes of one list response: gRPC clients refuse messages over
/// 4 MiB by default.
pub(crate) const MAX_LIST_BYTES: usize = 3 << 20;
/// Longest value shown in a list; `show` gives it whole.
const LIST_VALUE_BYTES: usize = 1024;

/// The `limit` a list call asked for, defaulted and capped.
pub(crate) fn list_limit(asked: u32) -> usize {
    match asked {
        0 => 100,
        n => (n as usize).min(MAX_LIST),
    }
}

/// A value as a list shows it: whole when short, else its start and size.
pub(crate) fn list_value(v: &str) -> String {
    if v.len() <= LIST_VALUE_BYTES {
        return v.to_string();
    }
    let mut end = 256;
    while !v.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes; `show` gives it whole)", &v[..end], v.len())
}

/// Keeps items while their encoded sizes add up to at most
/// [`MAX_LIST_BYTES`]; true when some were left out.
pub(crate) fn fit<T: prost::Message>(items: &mut Vec<T>) -> bool {
    let mut total = 0;
    let keep = items
        .iter()
        .take_while(|i| {
            total += i.encoded_len() + 8;
            total <= MAX_LIST_BYTES
        })
        .count();
    let cut = keep < items.len();
    items.truncate(keep);
    cut
}

/// Maps engine errors to gRPC statuses, in one place, keeping the message a
/// user can act on.
pub(crate) trait IntoStatus {
    fn into_status(self) -> Status;
}

impl IntoStatus for caroni_manager::Error {
    fn into_status(self) -> Status {
        use caroni_manager::Error as E;
        match self {
            E::InvalidTemplate(_) | E::BadName(_) | E::BadInput(_) => {
                Status::invalid_argument(self.to_string())
            }
            E::Unavailable(_) => Status::unavailable(self.to_string()),
            E::Finished(_) => Status::failed_precondition(self.to_string()),
            E::NotFound(_) => Status::not_found(self.to_string()),
            E::Store(e) => internal(e),
        }
    }
}

impl IntoStatus for caroni_agent::Error {
    fn into_status(self) -> Status {
        use caroni_agent::Error as E;
        match self {
            E::InvalidJobType(_) | E::BadInput(_) => Status::invalid_argument(self.to_string()),
            E::NotFound(_) => Status::not_found(self.to_string()),
            E::AlreadyExists(_) => Status::already_exists(self.to_string()),
            E::Store(e) => internal(e),
        }
    }
}

fn internal(e: impl std::fmt::Display) -> Status {
    tracing::error!(error = %e, "internal error serving a client request");
    Status::internal(format!("{e}; see the node's log"))
}

/// Runs blocking storage work off the async threads.
pub(crate) async fn blocking<T, E>(
    f: impl FnOnce() -> Result<T, E> + Send + 'static,
) -> Result<T, Status>
where
    T: Send + 'static,
    E: IntoStatus + Send + 'static,
{
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(IntoStatus::into_status),
        Err(e) => Err(internal(e)),
    }
}

/// Checks the bearer token when one is configured, in constant time, and
/// makes an address that keeps giving wrong ones wait (see
/// [`crate::attempts`]).
#[derive(Clone)]
pub struct TokenCheck {
    expected: Option<std::sync::Arc<str>>,
    attempts: std::sync::Arc<crate::attempts::Attempts>,
}

impl TokenCheck {
    /// `None` accepts every caller (loopback-only API).
    pub fn new(token: Option<&str>) -> Self {
        Self {
            expected: token.map(std::sync::Arc::from),
            attempts: std::sync::Arc::new(crate::attempts::Attempts::new("client API call")),
        }
    }
}

impl tonic::service::Interceptor for TokenCheck {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        let Some(expected) = &self.expected else {
            return Ok(req);
        };
        let addr = req
            .extensions()
            .get::<caroni_peer::tls::LinkInfo>()
            .map(|l| l.remote.ip())
            .unwrap_or(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED));
        if let Err(wait) = self.attempts.check(addr) {
            return Err(Status::resource_exhausted(
                wait.message(self.attempts.what()),
            ));
        }
        let given = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(|v| v.strip_prefix("Bearer ").unwrap_or(v));
        match given {
            Some(got) if crate::attempts::token_matches(got.as_bytes(), expected.as_bytes()) => {
                Ok(req)
            }
            Some(_) => {
                self.attempts.failed(addr);
                Err(Status::unauthenticated(
                    "wrong API token; check --token or CARONI_TOKEN",
                ))
            }
            None => Err(Status::unauthenticated(
                "this node's API needs a token: pass --token or set CARONI_TOKEN",
            )),
        }
    }
}

/// Refuses calls to a role the node does not have.
pub(crate) fn require_role<T>(has: Option<T>, role: &str) -> Result<T, Status> {
    has.ok_or_else(|| {
        Status::failed_precondition(format!(
            "this node does not have the {role} role; restart it with --role {role} or --role both, or point --node at a {role}"
        ))
    })
}

/// Parses a UUID given by a user.
/// An id or a unique prefix of one (at least 4 hex digits; dashes
/// optional): `lookup(prefix, after)` lists ids in key order whose bytes
/// start with the prefix's whole bytes, from after `after` (a few suffice
/// to tell "none", "one" and "several").
pub(crate) fn resolve_id(
    what: &str,
    s: &str,
    lookup: impl FnOnce(&[u8], Option<&[u8]>) -> Result<Vec<uuid::Uuid>, Status>,
) -> Result<uuid::Uuid, Status> {
    if let Ok(id) = s.trim().parse() {
        return Ok(id);
    }
    let hex: String = s
        .trim()
        .chars()
        .filter(|c| *c != '-')
        .map(|c| c.to_ascii_lowercase())
        .collect();
    if hex.len() < 4 || hex.len() > 32 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(Status::invalid_argument(format!(
            "`{s}` is not a {what} id: give a UUID or at least its first 4 hex digits (a unique prefix)"
        )));
    }
    let bytes: Vec<u8> = (0..hex.len() / 2)
        .filter_map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok())
        .collect();
    // An odd last digit: start at the first key whose next byte has it as
    // its high half (every key below sorts before `after`).
    let after: Option<Vec<u8>> = match u8::from_str_radix(&hex[hex.len() / 2 * 2..], 16) {
        Ok(nibble) if hex.len() % 2 == 1 && nibble > 0 => {
            let mut a = bytes.clone();
            a.push((nibble << 4) - 1);
            a.extend([0xff; 16]);
            Some(a)
        }
        _ => None,
    };
    let found: Vec<uuid::Uuid> = lookup(&bytes, after.as_deref())?
        .into_iter()
        .filter(|id| id.simple().to_string().starts_with(&hex))
        .collect();
    match found.as_slice() {
        [] => Err(Status::not_found(format!("no {what} id starts with `{s}`"))),
        [one] => Ok(*one),
        [a, b, ..] => Err(Status::invalid_argument(format!(
            "`{s}` is ambiguous: {what}s {a} and {b} (and maybe more) start with it; type more of the id"
        ))),
    }
}
