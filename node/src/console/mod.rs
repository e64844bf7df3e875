//! The web console: every node serves pages to watch and steer it on its
//! own listener (`--console-listen`, default `127.0.0.1:7073`).
//!
//! - The pages are one embedded HTML/JS/CSS application (no build step, no
//!   CDN); it reads JSON from `/api/…` and follows `/events`, a stream of
//!   Server-Sent Events that says what changed (a workflow, a job, a job
//!   type, a template) as soon as the change is written.
//! - The data endpoints call the client API's own services in process, so
//!   validation, limits and messages are the API's.
//! - Who may use it and from where (sessions, hosts, framing, forged
//!   requests, guessing) is [`auth`]'s; its connections are bounded by a
//!   gate like the client API's.

mod auth;
mod files;
mod metrics;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use caroni_proto::v1 as pb;
use caroni_proto::v1::{
    agent_service_server::AgentService, manager_service_server::ManagerService,
    node_service_server::NodeService,
};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::broadcast;
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::api::{json as js, AgentApi, ManagerApi, NodeApi};

const INDEX: &str = include_str!("assets/index.html");
const APP_JS: &str = include_str!("assets/app.js");
const STYLE: &str = include_str!("assets/style.css");

/// Largest request body (a CWL document is at most 1 MiB, a job type's
/// body 100 KiB).
const MAX_BODY: usize = 2 << 20;
/// Longest wait for a request's head.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Interval of the `tick` event (the node page's counters); it also keeps
/// the event stream from counting as idle at the gate.
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
    /// The node's files (uploads, downloads).
    pub blobs: caroni_blob::Blobs,
    /// The token the login page asks for (none: no login).
    pub token: Option<String>,
    /// `Host` names the console answers besides IP addresses and
    /// `localhost` (`--console-host`).
    pub hosts: Vec<String>,
}

struct Inner {
    src: Sources,
    auth: auth::Auth,
    /// Signs download links; new in each process.
    link_key: Vec<u8>,
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
    let listener = crate::listen(addr).with_context(|| {
        format!("cannot listen on --console-listen {addr}; is another node using this port? (`off` disables the console)")
    })?;
    let bound = listener.local_addr()?;
    let (edits, _) = broadcast::channel(256);
    let auth = auth::Auth::new(src.token.clone(), src.hosts.clone());
    let link_key = [uuid::Uuid::new_v4(), uuid::Uuid::new_v4()]
        .iter()
        .flat_map(|u| u.as_bytes().to_vec())
        .collect();
    let console = Console(Arc::new(Inner {
        src,
        auth,
        link_key,
        edits,
    }));
    let app = router(console);
    let listener =
        caroni_peer::GatedListener::new(listener, "console", caroni_peer::GateLimits::default());
    Ok((bound, async move {
        let mut conns = tokio::task::JoinSet::new();
        loop {
            let (io, remote) = tokio::select! {
                _ = cancel.cancelled() => break,
                c = listener.accept() => c,
            };
            while conns.try_join_next().is_some() {}
            let svc = tower::ServiceExt::map_request(
                app.clone(),
                move |mut r: http::Request<hyper::body::Incoming>| {
                    r.extensions_mut()
                        .insert(axum::extract::ConnectInfo(auth::Client(remote)));
                    r
                },
            );
            // A request's head must arrive within HEADER_TIMEOUT: a client
            // that trickles it is closed.
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(
                    hyper_util::rt::TokioIo::new(io),
                    hyper_util::service::TowerToHyperService::new(svc),
                );
            let stop = cancel.clone();
            conns.spawn(async move {
                let mut conn = std::pin::pin!(conn);
                tokio::select! {
                    _ = conn.as_mut() => {}
                    _ = stop.cancelled() => {
                        conn.as_mut().graceful_shutdown();
                        let _ = tokio::time::timeout(Duration::from_secs(1), conn).await;
                    }
                }
            });
        }
        conns.shutdown().await;
        Ok(())
    }))
}

fn router(console: Console) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/login", get(auth::login_needed).post(auth::login))
        .route("/logout", post(auth::logout))
        .route("/assets/app.js", get(app_js))
        .route("/assets/style.css", get(style))
        .route("/events", get(events))
        .route("/metrics", get(metrics::metrics))
        .route("/api/node", get(node))
        .route("/api/ledger", get(ledger))
        .route("/api/workflows", get(list_workflows).post(run_workflow))
        .route("/api/workflows/{id}", get(get_workflow))
        .route("/api/workflows/{id}/cancel", post(cancel_workflow))
        .route("/api/workflows/{id}/retry", post(retry_workflow))
        .route("/api/workflows/{id}/rerun", post(rerun_workflow))
        .route("/api/workflows/{id}/logs", get(workflow_logs))
        .route("/api/templates", get(list_templates).post(put_template))
        .route(
            "/api/templates/{name}",
            get(get_template).delete(delete_template),
        )
        .route("/api/jobs", get(list_jobs))
        .route("/api/jobs/{id}", get(get_job))
        .route("/api/jobtypes", get(list_job_types))
        .route(
            "/api/jobtypes/{name}",
            get(get_job_type).put(put_job_type).delete(delete_job_type),
        )
        .route(
            "/api/files",
            post(files::upload).layer(DefaultBodyLimit::disable()),
        )
        .route("/api/files/{sha}/link", post(files::link))
        .route("/files/{sha}", get(files::download))
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(
            console.clone(),
            auth::guard,
        ))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(console)
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

async fn index() -> Html<&'static str> {
    Html(INDEX)
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

/// The node's ledger (both chains, the newest 50 entries of each).
async fn ledger(State(c): State<Console>) -> Answer {
    let l =
        c.0.src
            .node
            .get_ledger(req(pb::GetLedgerRequest::default()))
            .await?
            .into_inner();
    Ok(Json(js::ledger(&l)))
}

#[derive(Deserialize)]
struct WorkflowQuery {
    state: Option<String>,
    template: Option<String>,
    /// An id prefix to search for.
    id: Option<String>,
    /// The previous page's `next`.
    after: Option<String>,
    per_page: Option<usize>,
}

async fn list_workflows(State(c): State<Console>, Query(q): Query<WorkflowQuery>) -> Answer {
    // Filtered and paged by the manager over the whole history.
    let per_page = q.per_page.unwrap_or(25).clamp(1, 200);
    let resp =
        c.0.src
            .manager
            .list_workflows(req(pb::ListWorkflowsRequest {
                limit: per_page as u32,
                states: q.state.iter().filter(|s| !s.is_empty()).cloned().collect(),
                template: q.template.clone().unwrap_or_default(),
                id_prefix: q.id.clone().unwrap_or_default(),
                page_token: q.after.clone().unwrap_or_default(),
                ..Default::default()
            }))
            .await?
            .into_inner();
    let items: Vec<Value> = resp.workflows.iter().map(js::workflow).collect();
    let templates: Vec<String> =
        c.0.src
            .manager
            .list_templates(req(pb::ListTemplatesRequest {}))
            .await?
            .into_inner()
            .templates
            .into_iter()
            .map(|t| t.name)
            .collect();
    Ok(Json(json!({
        "items": items,
        "next": resp.next_page_token,
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
struct LogsQuery {
    #[serde(default)]
    step: String,
    #[serde(default)]
    attempt: u32,
}

/// Both logs of an attempt, whole (as kept by the agent), as text.
async fn workflow_logs(
    State(c): State<Console>,
    Path(id): Path<String>,
    axum::extract::Query(q): axum::extract::Query<LogsQuery>,
) -> Answer {
    let mut chunks =
        c.0.src
            .manager
            .get_logs(req(pb::GetLogsRequest {
                workflow_id: id,
                step: q.step,
                attempt: q.attempt,
                stream: String::new(),
                follow: false,
            }))
            .await?
            .into_inner();
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let (mut job, mut agent) = (String::new(), String::new());
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk?;
        match chunk.stream.as_str() {
            "stdout" => out.extend_from_slice(&chunk.data),
            _ => err.extend_from_slice(&chunk.data),
        }
        job = chunk.job_id;
        agent = chunk.agent;
    }
    Ok(Json(json!({
        "stdout": String::from_utf8_lossy(&out),
        "stderr": String::from_utf8_lossy(&err),
        "job_id": job,
        "agent": agent,
    })))
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
                request_id: String::new(),
                ..Default::default()
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

async fn retry_workflow(State(c): State<Console>, Path(id): Path<String>) -> Answer {
    let w =
        c.0.src
            .manager
            .retry_workflow(req(pb::GetWorkflowRequest { workflow_id: id }))
            .await?
            .into_inner();
    Ok(Json(js::workflow(&w)))
}

async fn rerun_workflow(State(c): State<Console>, Path(id): Path<String>) -> Answer {
    let r =
        c.0.src
            .manager
            .rerun_workflow(req(pb::RerunWorkflowRequest {
                workflow_id: id,
                ..Default::default()
            }))
            .await?
            .into_inner();
    Ok(Json(json!({"workflow_id": r.workflow_id})))
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

#[derive(Deserialize)]
struct JobQuery {
    state: Option<String>,
    /// The previous page's `next`.
    after: Option<String>,
}

async fn list_jobs(State(c): State<Console>, Query(q): Query<JobQuery>) -> Answer {
    let r =
        c.0.src
            .agent
            .list_jobs(req(pb::ListJobsRequest {
                limit: 50,
                states: q.state.into_iter().filter(|s| !s.is_empty()).collect(),
                page_token: q.after.unwrap_or_default(),
                ..Default::default()
            }))
            .await?
            .into_inner();
    Ok(Json(json!({
        "items": r.jobs.iter().map(js::job).collect::<Vec<_>>(),
        "truncated": r.truncated,
        "next": r.next_page_token,
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

async fn delete_job_type(State(c): State<Console>, Path(name): Path<String>) -> Answer {
    c.0.src
        .agent
        .delete_job_type(req(pb::DeleteJobTypeRequest { name: name.clone() }))
        .await?;
    Ok(Json(json!({"deleted": name})))
}

async fn delete_template(State(c): State<Console>, Path(name): Path<String>) -> Answer {
    c.0.src
        .manager
        .delete_template(req(pb::DeleteTemplateRequest { name: name.clone() }))
        .await?;
    Ok(Json(json!({"deleted": name})))
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
                    // The form does not edit prices: kept as they are.
                    price: kept.price,
                }),
                replace: !b.create,
            }))
            .await?
            .into_inner();
    let _ = c.0.edits.send(("jobtype", j.name.clone()));
    Ok(Json(js::job_type(&j)))
}
