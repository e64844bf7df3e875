//! The web console: every node serves pages to watch and steer it on its
//! own listener (`--console-listen`, default `127.0.0.1:7073`).
//!
//! - The pages are one embedded HTML/JS/CSS application (no build step, no
//!   CDN); it reads JSON from `/api/…` and follows `/events`, a stream of
//!   Server-Sent Events that says what changed (a workflow, a job, a job
//!   type, a template) as soon as the change is written.
//! - The data endpoints call the client API's own services in process, so
//!   validation, limits and messages are the API's.
//! - With `--api-token`, the console asks for the token once (login page)
//!   and keeps a session in an `HttpOnly`, `SameSite=Strict` cookie that
//!   expires after 12 hours; every data request and the event stream check
//!   it. Requests that change something must also carry the header
//!   `x-caroni-console` (which a cross-site form cannot set).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::middleware::Next;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Form, Json, Router};
use caroni_proto::v1 as pb;
use caroni_proto::v1::{
    agent_service_server::AgentService, manager_service_server::ManagerService,
    node_service_server::NodeService,
};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::broadcast;
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::api::{json as js, AgentApi, ManagerApi, NodeApi};

const INDEX: &str = include_str!("assets/index.html");
const LOGIN: &str = include_str!("assets/login.html");
const APP_JS: &str = include_str!("assets/app.js");
const STYLE: &str = include_str!("assets/style.css");

/// How long a login lasts.
const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
/// Most sessions kept; the oldest go first.
const MAX_SESSIONS: usize = 1024;
/// Largest request body (a CWL document is at most 1 MiB, a job type's
/// body 100 KiB).
const MAX_BODY: usize = 2 << 20;
/// Name of the session cookie.
const COOKIE: &str = "caroni_session";
/// Header required on requests that change something.
const CSRF_HEADER: &str = "x-caroni-console";
/// Most workflows the list pages through (the newest ones).
const LIST_WINDOW: u32 = 1000;
/// Interval of the `tick` event (the node page's counters).
const TICK: Duration = Duration::from_secs(1);

/// What the console needs of the node.
pub struct Sources {
    /// Node identity, peers, stats.
    pub node: NodeApi,
    /// Templates and workflows.
    pub manager: ManagerApi,
    /// Job types and jobs.
    pub agent: AgentApi,
    /// Workflow changes, on a manager.
    pub manager_handle: Option<caroni_manager::service::Handle>,
    /// Job changes, on an agent.
    pub agent_handle: Option<caroni_agent::service::Handle>,
    /// The token the login page asks for (none: no login).
    pub token: Option<String>,
}

struct Inner {
    src: Sources,
    /// Session id → expiry (ms since the epoch).
    sessions: Mutex<HashMap<String, u64>>,
    /// Changes made through the console that no engine announces.
    edits: broadcast::Sender<(&'static str, String)>,
}

#[derive(Clone)]
struct Console(Arc<Inner>);

/// Binds the console and returns the task that serves it until `cancel`.
pub async fn serve(
    addr: SocketAddr,
    src: Sources,
    cancel: CancellationToken,
) -> anyhow::Result<(
    SocketAddr,
    impl std::future::Future<Output = anyhow::Result<()>>,
)> {
    use anyhow::Context as _;
    let listener = TcpListener::bind(addr).await.with_context(|| {
        format!("cannot listen on --console-listen {addr}; is another node using this port? (`off` disables the console)")
    })?;
    let bound = listener.local_addr()?;
    let (edits, _) = broadcast::channel(256);
    let console = Console(Arc::new(Inner {
        src,
        sessions: Mutex::new(HashMap::new()),
        edits,
    }));
    let app = router(console);
    Ok((bound, async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(cancel.cancelled_owned())
            .await
            .context("console server failed")
    }))
}

fn router(console: Console) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/login", get(login_page).post(login))
        .route("/logout", post(logout))
        .route("/assets/app.js", get(app_js))
        .route("/assets/style.css", get(style))
        .route("/events", get(events))
        .route("/metrics", get(metrics))
        .route("/api/node", get(node))
        .route("/api/workflows", get(list_workflows).post(run_workflow))
        .route("/api/workflows/{id}", get(get_workflow))
        .route("/api/workflows/{id}/cancel", post(cancel_workflow))
        .route("/api/templates", get(list_templates).post(put_template))
        .route("/api/templates/{name}", get(get_template))
        .route("/api/jobs", get(list_jobs))
        .route("/api/jobs/{id}", get(get_job))
        .route("/api/jobtypes", get(list_job_types))
        .route("/api/jobtypes/{name}", get(get_job_type).put(put_job_type))
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(console.clone(), guard))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(console)
}

fn now_ms() -> u64 {
    caroni_types::now_ms()
}

/// An error as the pages show it: `{"error": …}` with an HTTP status.
struct Failure(StatusCode, String);

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

impl From<tonic::Status> for Failure {
    fn from(s: tonic::Status) -> Self {
        use tonic::Code;
        let code = match s.code() {
            Code::InvalidArgument | Code::OutOfRange => StatusCode::BAD_REQUEST,
            Code::NotFound => StatusCode::NOT_FOUND,
            Code::AlreadyExists | Code::FailedPrecondition | Code::Aborted => StatusCode::CONFLICT,
            Code::PermissionDenied | Code::Unauthenticated => StatusCode::FORBIDDEN,
            Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
            Code::Unavailable | Code::ResourceExhausted => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Failure(code, s.message().to_string())
    }
}

type Answer = Result<Json<Value>, Failure>;

fn req<T>(msg: T) -> tonic::Request<T> {
    tonic::Request::new(msg)
}

fn session_of(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v.to_string())
}

impl Console {
    fn logged_in(&self, headers: &HeaderMap) -> bool {
        if self.0.src.token.is_none() {
            return true;
        }
        let Some(id) = session_of(headers) else {
            return false;
        };
        let mut s = self
            .0
            .sessions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = now_ms();
        s.retain(|_, until| *until > now);
        s.contains_key(&id)
    }
}

/// Checks the session (when a token is set) and, on changes, the header
/// a cross-site form cannot send.
async fn guard(State(c): State<Console>, request: Request, next: Next) -> Response {
    let path = request.uri().path().to_string();
    let bearer = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .zip(c.0.src.token.as_deref())
        .is_some_and(|(given, token)| same(given.as_bytes(), token.as_bytes()));
    let open = path == "/login" || path == "/assets/style.css" || (path == "/metrics" && bearer);
    if !open && !c.logged_in(request.headers()) {
        return if path.starts_with("/api/") || path == "/events" || path == "/metrics" {
            Failure(
                StatusCode::UNAUTHORIZED,
                "log in first: open the console's login page and give the node's --api-token"
                    .into(),
            )
            .into_response()
        } else {
            Redirect::to("/login").into_response()
        };
    }
    let changes = !matches!(*request.method(), Method::GET | Method::HEAD);
    if changes && path.starts_with("/api/") && !request.headers().contains_key(CSRF_HEADER) {
        return Failure(
            StatusCode::FORBIDDEN,
            format!("requests that change something must carry the header {CSRF_HEADER}"),
        )
        .into_response();
    }
    let mut resp = next.run(request).await;
    resp.headers_mut().insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    resp
}

async fn index() -> Html<&'static str> {
    Html(INDEX)
}

async fn login_page(State(c): State<Console>) -> Response {
    if c.0.src.token.is_none() {
        return Redirect::to("/").into_response();
    }
    Html(LOGIN.replace("{{error}}", "")).into_response()
}

#[derive(Deserialize)]
struct LoginForm {
    token: String,
}

fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn login(State(c): State<Console>, Form(f): Form<LoginForm>) -> Response {
    let Some(token) = &c.0.src.token else {
        return Redirect::to("/").into_response();
    };
    if !same(f.token.as_bytes(), token.as_bytes()) {
        tracing::warn!("console login refused: wrong token");
        return (
            StatusCode::UNAUTHORIZED,
            Html(LOGIN.replace(
                "{{error}}",
                "<p class=\"error\" id=\"login-error\">That is not this node's token (--api-token). Try again.</p>",
            )),
        )
            .into_response();
    }
    let id = format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    );
    {
        let mut s =
            c.0.sessions
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        if s.len() >= MAX_SESSIONS {
            if let Some(oldest) = s.iter().min_by_key(|(_, t)| **t).map(|(k, _)| k.clone()) {
                s.remove(&oldest);
            }
        }
        s.insert(id.clone(), now_ms() + SESSION_TTL.as_millis() as u64);
    }
    let cookie = format!(
        "{COOKIE}={id}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}",
        SESSION_TTL.as_secs()
    );
    ([(header::SET_COOKIE, cookie)], Redirect::to("/")).into_response()
}

async fn logout(State(c): State<Console>, headers: HeaderMap) -> Response {
    if let Some(id) = session_of(&headers) {
        c.0.sessions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&id);
    }
    (
        [(
            header::SET_COOKIE,
            format!("{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0"),
        )],
        Redirect::to("/login"),
    )
        .into_response()
}

async fn app_js() -> Response {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        APP_JS,
    )
        .into_response()
}

async fn style() -> Response {
    ([(header::CONTENT_TYPE, "text/css; charset=utf-8")], STYLE).into_response()
}

async fn not_found() -> Failure {
    Failure(StatusCode::NOT_FOUND, "no such page on this console".into())
}

/// What changed, as Server-Sent Events: `workflow`, `job`, `jobtype`,
/// `template` (data: JSON with the id or name), `tick` every second and
/// `resync` when events were missed.
async fn events(
    State(c): State<Console>,
) -> Sse<impl tokio_stream::Stream<Item = Result<Event, std::convert::Infallible>>> {
    use tokio_stream::wrappers::{
        errors::BroadcastStreamRecvError, BroadcastStream, IntervalStream,
    };
    type Item = Result<Event, std::convert::Infallible>;
    let lagged = |_: BroadcastStreamRecvError| Ok(Event::default().event("resync").data("{}"));
    let hello: std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Item> + Send>> =
        Box::pin(tokio_stream::once(Ok(Event::default()
            .event("hello")
            .data("{}"))));
    let mut all = hello;
    if let Some(m) = &c.0.src.manager_handle {
        let s = BroadcastStream::new(m.subscribe()).map(move |r| match r {
            Ok(ch) => Ok(Event::default()
                .event("workflow")
                .data(json!({"id": ch.id.to_string(), "state": ch.state.as_str()}).to_string())),
            Err(e) => lagged(e),
        });
        all = Box::pin(all.merge(s));
    }
    if let Some(a) = &c.0.src.agent_handle {
        let s = BroadcastStream::new(a.subscribe()).map(move |r| match r {
            Ok(ch) => Ok(Event::default()
                .event("job")
                .data(json!({"id": ch.id.to_string(), "state": ch.state.as_str()}).to_string())),
            Err(e) => lagged(e),
        });
        all = Box::pin(all.merge(s));
    }
    let edits = BroadcastStream::new(c.0.edits.subscribe()).map(move |r| match r {
        Ok((kind, name)) => Ok(Event::default()
            .event(kind)
            .data(json!({ "name": name }).to_string())),
        Err(e) => lagged(e),
    });
    let ticks = IntervalStream::new(tokio::time::interval(TICK))
        .map(|_| Ok(Event::default().event("tick").data("{}")));
    Sse::new(all.merge(edits).merge(ticks)).keep_alive(KeepAlive::default())
}

async fn node(State(c): State<Console>) -> Answer {
    let n = &c.0.src.node;
    let info = n.get_info(req(pb::GetInfoRequest {})).await?.into_inner();
    let peers = n
        .list_peers(req(pb::ListPeersRequest {}))
        .await?
        .into_inner()
        .peers;
    let stats = n.get_stats(req(pb::GetStatsRequest {})).await?.into_inner();
    Ok(Json(json!({
        "info": js::node_info(&info),
        "peers": peers.iter().map(js::peer).collect::<Vec<_>>(),
        "stats": {
            "synced_writes": stats.synced_writes,
            "messages_delivered": stats.messages_delivered,
            "requests_published": stats.requests_published,
            "cpu_seconds": stats.cpu_seconds,
            "rss_bytes": stats.rss_bytes,
            "jobs_completed": stats.jobs_completed,
            "jobs_failed": stats.jobs_failed,
            "workflows_completed": stats.workflows_completed,
            "workflows_failed": stats.workflows_failed,
            "workflows_live": stats.workflows_live,
            "workflows_waiting": stats.workflows_waiting,
        },
    })))
}

#[derive(Deserialize)]
struct WorkflowQuery {
    state: Option<String>,
    template: Option<String>,
    page: Option<usize>,
    per_page: Option<usize>,
}

async fn list_workflows(State(c): State<Console>, Query(q): Query<WorkflowQuery>) -> Answer {
    let resp =
        c.0.src
            .manager
            .list_workflows(req(pb::ListWorkflowsRequest { limit: LIST_WINDOW }))
            .await?
            .into_inner();
    let state = q.state.filter(|s| !s.is_empty());
    let template = q.template.filter(|s| !s.is_empty());
    let matching: Vec<&pb::Workflow> = resp
        .workflows
        .iter()
        .filter(|w| state.as_ref().is_none_or(|s| &w.state == s))
        .filter(|w| template.as_ref().is_none_or(|t| &w.template == t))
        .collect();
    let per_page = q.per_page.unwrap_or(25).clamp(1, 200);
    let pages = matching.len().div_ceil(per_page).max(1);
    let page = q.page.unwrap_or(1).clamp(1, pages);
    let items: Vec<Value> = matching
        .iter()
        .skip((page - 1) * per_page)
        .take(per_page)
        .map(|w| js::workflow(w))
        .collect();
    let mut templates: Vec<&str> = resp.workflows.iter().map(|w| w.template.as_str()).collect();
    templates.sort_unstable();
    templates.dedup();
    Ok(Json(json!({
        "items": items,
        "page": page,
        "pages": pages,
        "total": matching.len(),
        "window": LIST_WINDOW,
        "truncated": resp.truncated,
        "templates": templates,
    })))
}

async fn get_workflow(State(c): State<Console>, Path(id): Path<String>) -> Answer {
    let w =
        c.0.src
            .manager
            .get_workflow(req(pb::GetWorkflowRequest { workflow_id: id }))
            .await?
            .into_inner();
    Ok(Json(js::workflow(&w)))
}

#[derive(Deserialize)]
struct RunBody {
    template: String,
    #[serde(default)]
    inputs: HashMap<String, String>,
}

async fn run_workflow(State(c): State<Console>, Json(b): Json<RunBody>) -> Answer {
    let r =
        c.0.src
            .manager
            .run_workflow(req(pb::RunWorkflowRequest {
                template: b.template,
                inputs: b.inputs,
            }))
            .await?
            .into_inner();
    Ok(Json(json!({ "workflow_id": r.workflow_id })))
}

async fn cancel_workflow(State(c): State<Console>, Path(id): Path<String>) -> Answer {
    let w =
        c.0.src
            .manager
            .cancel_workflow(req(pb::GetWorkflowRequest { workflow_id: id }))
            .await?
            .into_inner();
    Ok(Json(js::workflow(&w)))
}

async fn list_templates(State(c): State<Console>) -> Answer {
    let r =
        c.0.src
            .manager
            .list_templates(req(pb::ListTemplatesRequest {}))
            .await?
            .into_inner();
    Ok(Json(json!(r
        .templates
        .iter()
        .map(js::template)
        .collect::<Vec<_>>())))
}

async fn get_template(State(c): State<Console>, Path(name): Path<String>) -> Answer {
    let t =
        c.0.src
            .manager
            .get_template(req(pb::GetTemplateRequest { name }))
            .await?
            .into_inner();
    Ok(Json(js::template(&t)))
}

#[derive(Deserialize)]
struct TemplateBody {
    name: String,
    cwl: String,
}

async fn put_template(State(c): State<Console>, Json(b): Json<TemplateBody>) -> Answer {
    let t =
        c.0.src
            .manager
            .put_template(req(pb::PutTemplateRequest {
                name: b.name,
                cwl: b.cwl,
            }))
            .await?
            .into_inner();
    let _ = c.0.edits.send(("template", t.name.clone()));
    Ok(Json(js::template(&t)))
}

async fn list_jobs(State(c): State<Console>) -> Answer {
    let r =
        c.0.src
            .agent
            .list_jobs(req(pb::ListJobsRequest { limit: 200 }))
            .await?
            .into_inner();
    Ok(Json(json!({
        "items": r.jobs.iter().map(js::job).collect::<Vec<_>>(),
        "truncated": r.truncated,
    })))
}

async fn get_job(State(c): State<Console>, Path(id): Path<String>) -> Answer {
    let j =
        c.0.src
            .agent
            .get_job(req(pb::GetJobRequest { job_id: id }))
            .await?
            .into_inner();
    Ok(Json(js::job(&j)))
}

async fn list_job_types(State(c): State<Console>) -> Answer {
    let r =
        c.0.src
            .agent
            .list_job_types(req(pb::ListJobTypesRequest {}))
            .await?
            .into_inner();
    Ok(Json(json!(r
        .job_types
        .iter()
        .map(js::job_type)
        .collect::<Vec<_>>())))
}

async fn get_job_type(State(c): State<Console>, Path(name): Path<String>) -> Answer {
    let j =
        c.0.src
            .agent
            .get_job_type(req(pb::GetJobTypeRequest { name }))
            .await?
            .into_inner();
    Ok(Json(js::job_type(&j)))
}

#[derive(Deserialize)]
struct JobTypeBody {
    #[serde(default)]
    inputs: Vec<String>,
    #[serde(default)]
    outputs: Vec<String>,
    body: String,
    #[serde(default)]
    timeout_seconds: u32,
    #[serde(default)]
    max_output_bytes: u64,
    /// Create instead of replacing.
    #[serde(default)]
    create: bool,
}

async fn put_job_type(
    State(c): State<Console>,
    Path(name): Path<String>,
    Json(b): Json<JobTypeBody>,
) -> Answer {
    // An edit keeps the job type's executor and its settings.
    let kept = if b.create {
        None
    } else {
        c.0.src
            .agent
            .get_job_type(req(pb::GetJobTypeRequest { name: name.clone() }))
            .await
            .ok()
            .map(|r| r.into_inner())
    }
    .unwrap_or_default();
    let j =
        c.0.src
            .agent
            .put_job_type(req(pb::PutJobTypeRequest {
                job_type: Some(pb::JobType {
                    name,
                    inputs: b.inputs,
                    outputs: b.outputs,
                    body: b.body,
                    timeout_seconds: b.timeout_seconds,
                    max_output_bytes: b.max_output_bytes,
                    updated_at: None,
                    executor: kept.executor,
                    docker: kept.docker,
                    slurm: kept.slurm,
                }),
                replace: !b.create,
            }))
            .await?
            .into_inner();
    let _ = c.0.edits.send(("jobtype", j.name.clone()));
    Ok(Json(js::job_type(&j)))
}

/// The node's metrics in the Prometheus text format: what the engines
/// record as they work (histograms, counters) and what is read at scrape
/// time (workflows, jobs, outbox queues per peer). Off loopback, scrapers
/// authenticate with `Authorization: Bearer TOKEN`.
async fn metrics(State(c): State<Console>) -> Result<Response, Failure> {
    use prometheus_client::metrics::counter::Counter;
    use prometheus_client::metrics::family::Family;
    use prometheus_client::metrics::gauge::Gauge;
    use std::sync::atomic::Ordering::Relaxed;
    type Labels = Vec<(String, String)>;
    let l = |k: &str, v: &str| vec![(k.to_string(), v.to_string())];
    let mut registry = prometheus_client::registry::Registry::with_prefix("caroni");
    caroni_store::metrics::register(&mut registry);

    let workflows = Family::<Labels, Gauge>::default();
    let workflows_ended = Family::<Labels, Counter>::default();
    if let Some(m) = &c.0.src.manager_handle {
        let s = m.stats();
        let live = s.live.load(Relaxed) as i64;
        let waiting = s.waiting.load(Relaxed) as i64;
        workflows.get_or_create(&l("state", "waiting")).set(waiting);
        workflows
            .get_or_create(&l("state", "running"))
            .set(live.saturating_sub(waiting));
        workflows_ended
            .get_or_create(&l("state", "completed"))
            .inc_by(s.completed.load(Relaxed));
        workflows_ended
            .get_or_create(&l("state", "failed"))
            .inc_by(s.failed.load(Relaxed));
    }
    registry.register(
        "workflows",
        "Live workflows on this manager, by state",
        workflows,
    );
    registry.register(
        "workflows_ended",
        "Workflows that ended since this node started, by final state",
        workflows_ended,
    );
    let jobs_ended = Family::<Labels, Counter>::default();
    if let Some(a) = &c.0.src.agent_handle {
        let s = a.stats();
        jobs_ended
            .get_or_create(&l("state", "completed"))
            .inc_by(s.completed.load(Relaxed));
        jobs_ended
            .get_or_create(&l("state", "failed"))
            .inc_by(s.failed.load(Relaxed));
    }
    registry.register(
        "job_runs",
        "Job runs that ended on this agent since it started, by state",
        jobs_ended,
    );

    let peers =
        c.0.src
            .node
            .list_peers(req(pb::ListPeersRequest {}))
            .await?
            .into_inner()
            .peers;
    let queued = Family::<Labels, Gauge>::default();
    let delivered = Family::<Labels, Counter>::default();
    let dropped = Family::<Labels, Counter>::default();
    let refused = Family::<Labels, Counter>::default();
    for p in &peers {
        let peer = l("peer", &p.node_id);
        if !p.endpoint.is_empty() {
            queued.get_or_create(&peer).set(p.queued as i64);
            delivered.get_or_create(&peer).inc_by(p.delivered);
            dropped.get_or_create(&peer).inc_by(p.dropped);
        }
        if p.refused > 0 {
            refused.get_or_create(&peer).inc_by(p.refused);
        }
    }
    registry.register(
        "outbox_queued_messages",
        "Direct messages waiting in the outbox, per peer",
        queued,
    );
    registry.register(
        "outbox_delivered_messages",
        "Direct messages acknowledged by the peer since this node started",
        delivered,
    );
    registry.register(
        "outbox_dropped_messages",
        "Direct messages not queued or expired (a queue bound), per peer",
        dropped,
    );
    registry.register(
        "peer_refusals",
        "What this node refused of each peer since it started",
        refused,
    );

    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry)
        .map_err(|e| Failure(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    Ok((
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response())
}
