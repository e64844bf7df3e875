//! Who may use the console, and from where.
//!
//! - **A credential only the console's own origin can use.** Cookies are
//!   not scoped by port (and `SameSite` treats every port of a host as one
//!   site), so the console sets none. Logging in (`POST /login` with the
//!   node's `--api-token`) returns a session id that the page keeps in its
//!   origin's `localStorage` (scheme, host *and* port) and sends as the
//!   header `x-caroni-session` on every data request and on the event
//!   stream. No other page, not even one on another port of the same host,
//!   can read it, and a browser never sends it by itself.
//! - **Only the hosts the listener serves** (DNS rebinding): a request whose
//!   `Host` is not an IP address, `localhost` or a `--console-host` name is
//!   refused before anything else.
//! - **No framing, no sniffing, no referrer**: every answer carries a
//!   Content-Security-Policy with `frame-ancestors 'none'` that allows only
//!   the embedded assets, `X-Frame-Options: DENY`, `X-Content-Type-Options:
//!   nosniff` and `Referrer-Policy: no-referrer`.
//! - **No cross-site changes**: every `POST`/`PUT` (logins and logouts
//!   included) must carry the header `x-caroni-console`, which a cross-site
//!   form cannot send.
//! - **Slow guessing**: wrong tokens are counted per client address (see
//!   [`crate::attempts`]).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::Duration;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::json;

use super::{Console, Failure};
use crate::attempts::{token_matches, Attempts};

/// How long a login lasts.
pub(super) const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
/// Most sessions kept; the oldest go first.
const MAX_SESSIONS: usize = 1024;
/// Header that carries the session id.
pub(super) const SESSION_HEADER: &str = "x-caroni-session";
/// Header required on requests that change something.
pub(super) const CSRF_HEADER: &str = "x-caroni-console";
/// What the pages may load: their own scripts, styles and connections,
/// inline SVG images; nothing may frame them.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'";

/// Sessions and failed logins of one console.
pub(super) struct Auth {
    /// The token the login asks for (none: no login).
    pub token: Option<String>,
    /// `Host` names served besides IP addresses and `localhost`.
    pub hosts: Vec<String>,
    /// Session id → expiry (ms since the epoch).
    sessions: Mutex<HashMap<String, u64>>,
    attempts: Attempts,
}

impl Auth {
    pub(super) fn new(token: Option<String>, hosts: Vec<String>) -> Self {
        Self {
            token,
            hosts: hosts.into_iter().map(|h| h.to_ascii_lowercase()).collect(),
            sessions: Mutex::new(HashMap::new()),
            attempts: Attempts::new("console login"),
        }
    }

    fn sessions(&self) -> std::sync::MutexGuard<'_, HashMap<String, u64>> {
        self.sessions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// True when no token is set, or `headers` carry a live session.
    fn logged_in(&self, headers: &HeaderMap) -> bool {
        if self.token.is_none() {
            return true;
        }
        let Some(id) = headers.get(SESSION_HEADER).and_then(|v| v.to_str().ok()) else {
            return false;
        };
        let now = caroni_types::now_ms();
        let mut s = self.sessions();
        s.retain(|_, until| *until > now);
        s.contains_key(id)
    }

    /// True when `headers` carry the node's token as a bearer (scrapers).
    fn bearer(&self, headers: &HeaderMap) -> bool {
        headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .zip(self.token.as_deref())
            .is_some_and(|(given, token)| token_matches(given.as_bytes(), token.as_bytes()))
    }

    fn new_session(&self) -> String {
        let id = format!(
            "{}{}",
            uuid::Uuid::new_v4().simple(),
            uuid::Uuid::new_v4().simple()
        );
        let mut s = self.sessions();
        if s.len() >= MAX_SESSIONS {
            if let Some(oldest) = s.iter().min_by_key(|(_, t)| **t).map(|(k, _)| k.clone()) {
                s.remove(&oldest);
            }
        }
        s.insert(
            id.clone(),
            caroni_types::now_ms() + SESSION_TTL.as_millis() as u64,
        );
        id
    }

    /// `Host` values this console answers: IP addresses (a rebound name
    /// never is one), `localhost` and the configured names, any port.
    fn serves_host(&self, host: &str) -> bool {
        let name = match host.strip_prefix('[') {
            Some(rest) => {
                return rest
                    .split(']')
                    .next()
                    .is_some_and(|ip| ip.parse::<IpAddr>().is_ok())
            }
            None => host.rsplit_once(':').map_or(host, |(n, port)| {
                if port.chars().all(|c| c.is_ascii_digit()) {
                    n
                } else {
                    host
                }
            }),
        };
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        name.parse::<IpAddr>().is_ok() || name == "localhost" || self.hosts.contains(&name)
    }
}

/// The client's address, from the listener.
#[derive(Clone, Copy, Debug)]
pub(super) struct Client(pub SocketAddr);

fn security_headers(resp: &mut Response) {
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
}

/// Every request: the host, then the session (when a token is set) and,
/// on changes, the header a cross-site form cannot send; every answer
/// gets the security headers.
pub(super) async fn guard(State(c): State<Console>, request: Request, next: Next) -> Response {
    let mut resp = check(&c, request, next).await;
    security_headers(&mut resp);
    resp
}

async fn check(c: &Console, request: Request, next: Next) -> Response {
    let auth = &c.0.auth;
    let host = request
        .headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .or_else(|| request.uri().authority().map(|a| a.as_str()))
        .unwrap_or("");
    if !auth.serves_host(host) {
        return Failure(
            StatusCode::MISDIRECTED_REQUEST,
            format!("this console does not serve the host `{host}`: open it by its IP address or localhost, or start the node with --console-host {host}"),
        )
        .into_response();
    }
    let path = request.uri().path();
    let changes = !matches!(*request.method(), Method::GET | Method::HEAD);
    if changes && !request.headers().contains_key(CSRF_HEADER) {
        return Failure(
            StatusCode::FORBIDDEN,
            format!("requests that change something must carry the header {CSRF_HEADER}"),
        )
        .into_response();
    }
    // The page and its assets hold no data; the page asks for a login.
    let open = matches!(
        path,
        "/" | "/login" | "/assets/app.js" | "/assets/style.css"
    ) || (path == "/metrics" && auth.bearer(request.headers()))
        // A download link is signed; its handler checks the signature.
        || (path.starts_with("/files/") && request.method() == Method::GET);
    if !open && !auth.logged_in(request.headers()) {
        return Failure(
            StatusCode::UNAUTHORIZED,
            "log in first: open the console's page and give the node's --api-token".into(),
        )
        .into_response();
    }
    next.run(request).await
}

#[derive(Deserialize)]
pub(super) struct LoginBody {
    token: String,
}

/// `POST /login {"token": …}` → `{"session": id, "expires_in": s}`.
pub(super) async fn login(
    State(c): State<Console>,
    ConnectInfo(Client(from)): ConnectInfo<Client>,
    Json(b): Json<LoginBody>,
) -> Response {
    let auth = &c.0.auth;
    let Some(token) = &auth.token else {
        return Json(json!({ "session": "", "expires_in": 0 })).into_response();
    };
    let ip = from.ip();
    if let Err(wait) = auth.attempts.check(ip) {
        let mut resp =
            Failure(StatusCode::TOO_MANY_REQUESTS, wait.message("login")).into_response();
        if let Ok(v) = HeaderValue::from_str(&wait.0.as_secs().max(1).to_string()) {
            resp.headers_mut().insert(header::RETRY_AFTER, v);
        }
        return resp;
    }
    if !token_matches(b.token.as_bytes(), token.as_bytes()) {
        auth.attempts.failed(ip);
        return Failure(
            StatusCode::UNAUTHORIZED,
            "That is not this node's token (--api-token). Try again.".into(),
        )
        .into_response();
    }
    auth.attempts.succeeded(ip);
    Json(json!({
        "session": auth.new_session(),
        "expires_in": SESSION_TTL.as_secs(),
    }))
    .into_response()
}

/// `POST /logout`: ends the session the request carries.
pub(super) async fn logout(State(c): State<Console>, headers: HeaderMap) -> Response {
    if let Some(id) = headers.get(SESSION_HEADER).and_then(|v| v.to_str().ok()) {
        c.0.auth.sessions().remove(id);
    }
    Json(json!({ "logged_out": true })).into_response()
}

/// `GET /login`: whether a login is needed (the page asks first).
pub(super) async fn login_needed(State(c): State<Console>) -> Json<serde_json::Value> {
    Json(json!({ "token_required": c.0.auth.token.is_some() }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_ip_addresses_localhost_and_configured_names_are_served() {
        let a = Auth::new(None, vec!["Caroni.Example.org".into()]);
        for ok in [
            "127.0.0.1:7073",
            "127.0.0.1",
            "10.1.2.3:80",
            "[::1]:7073",
            "[::1]",
            "localhost:7073",
            "LOCALHOST",
            "caroni.example.org:7073",
            "caroni.example.org.",
        ] {
            assert!(a.serves_host(ok), "{ok}");
        }
        for bad in [
            "",
            "rebind.attacker.example:7073",
            "attacker.example",
            "localhost.attacker.example",
            "127.0.0.1.nip.io:7073",
            "[evil]:7073",
        ] {
            assert!(!a.serves_host(bad), "{bad}");
        }
    }
}
