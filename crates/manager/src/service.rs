//! The manager service: owns the live workflows, applies messages and
//! timers through the pure machine, and persists each change together with
//! the messages it causes (one write batch). Finished workflows live on
//! disk only.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use caroni_store::{keys::Key, tables, wire, Batch, Store, Table};
use caroni_types::msg::{Inbound, Msg, Outbound};
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::machine::{Ctx, Effect, Refusal};
use crate::model::Workflow;
use crate::{templates, Error};

const WORKFLOWS: Table<Workflow> = Table::new(tables::WORKFLOWS, "workflows");

/// Options.
#[derive(Debug, Clone)]
pub struct Options {
    /// This manager's peer endpoint.
    pub endpoint: String,
    /// Lease on live jobs.
    pub lease: Duration,
    /// Lifetime of a job request.
    pub request_ttl: Duration,
}

/// Why a message was not applied.
#[derive(Debug, thiserror::Error)]
pub enum DeliverError {
    /// Never acceptable.
    #[error("{0}")]
    Refused(String),
    /// Try again later.
    #[error("{0}")]
    Retry(String),
}

enum Cmd {
    Run(
        String,
        BTreeMap<String, String>,
        oneshot::Sender<Result<Uuid, Error>>,
    ),
    Cancel(Uuid, oneshot::Sender<Result<(), Error>>),
    Deliver(Inbound, oneshot::Sender<Result<(), DeliverError>>),
}

/// A cheap handle to the manager service.
#[derive(Clone)]
pub struct Handle {
    tx: mpsc::Sender<Cmd>,
    store: Store,
    events: broadcast::Sender<Uuid>,
}

impl std::fmt::Debug for Handle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("manager::Handle").finish()
    }
}

const STOPPED: &str = "the manager is shutting down";

impl Handle {
    /// Starts a workflow from a template; returns its id once it is durable.
    pub async fn run(
        &self,
        template: String,
        inputs: BTreeMap<String, String>,
    ) -> Result<Uuid, Error> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Cmd::Run(template, inputs, tx))
            .await
            .map_err(|_| Error::Unavailable(STOPPED.into()))?;
        rx.await.map_err(|_| Error::Unavailable(STOPPED.into()))?
    }

    /// Cancels a workflow.
    pub async fn cancel(&self, id: Uuid) -> Result<(), Error> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Cmd::Cancel(id, tx))
            .await
            .map_err(|_| Error::Unavailable(STOPPED.into()))?;
        rx.await.map_err(|_| Error::Unavailable(STOPPED.into()))?
    }

    /// Applies a direct message; returns once it is durable.
    pub async fn deliver(&self, msg: Inbound) -> Result<(), DeliverError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Cmd::Deliver(msg, tx))
            .await
            .map_err(|_| DeliverError::Retry(STOPPED.into()))?;
        rx.await.map_err(|_| DeliverError::Retry(STOPPED.into()))?
    }

    /// One workflow, from disk.
    pub fn get(&self, id: Uuid) -> Result<Workflow, Error> {
        self.store
            .get(WORKFLOWS, &Key::new().uuid(&id).finish())?
            .ok_or_else(|| {
                Error::NotFound(format!(
                    "no workflow {id}; `caroni workflow list` shows them"
                ))
            })
    }

    /// Workflows, newest first, at most `limit`. Workflow ids are UUID v7,
    /// so key order is creation order and only `limit` records are read.
    pub fn list(&self, limit: usize) -> Result<Vec<Workflow>, Error> {
        Ok(self.store.scan_last(WORKFLOWS, limit)?)
    }

    /// Ids of workflows as they change.
    pub fn subscribe(&self) -> broadcast::Receiver<Uuid> {
        self.events.subscribe()
    }
}

/// The manager service.
pub struct Service {
    opts: Options,
    store: Store,
    wire: Arc<dyn wire::Wire>,
    rx: mpsc::Receiver<Cmd>,
    events: broadcast::Sender<Uuid>,
    live: HashMap<Uuid, Workflow>,
    by_request: HashMap<Uuid, Uuid>,
    by_job: HashMap<Uuid, Uuid>,
}

impl Service {
    /// Loads live workflows from storage.
    pub fn new(
        opts: Options,
        store: Store,
        wire: Arc<dyn wire::Wire>,
    ) -> Result<(Self, Handle), Error> {
        let (tx, rx) = mpsc::channel(1024);
        let (events, _) = broadcast::channel(1024);
        let mut s = Self {
            opts,
            store: store.clone(),
            wire,
            rx,
            events: events.clone(),
            live: HashMap::new(),
            by_request: HashMap::new(),
            by_job: HashMap::new(),
        };
        for (_, wf) in store.scan(WORKFLOWS, &[])? {
            if !wf.state.is_final() {
                s.index(&wf);
                s.live.insert(wf.id, wf);
            }
        }
        Ok((s, Handle { tx, store, events }))
    }

    fn index(&mut self, wf: &Workflow) {
        for step in &wf.steps {
            if let Some(r) = &step.request {
                self.by_request.insert(r.id, wf.id);
            }
            for a in &step.attempts {
                if let Some(j) = a.job_id {
                    self.by_job.insert(j, wf.id);
                }
            }
        }
    }

    fn unindex(&mut self, wf: &Workflow) {
        for step in &wf.steps {
            for a in &step.attempts {
                if let Some(j) = a.job_id {
                    self.by_job.remove(&j);
                }
                self.by_request.remove(&a.request_id);
            }
            if let Some(r) = &step.request {
                self.by_request.remove(&r.id);
            }
        }
    }

    /// Runs until cancelled.
    pub async fn run(mut self, cancel: CancellationToken) {
        if !self.live.is_empty() {
            tracing::info!(workflows = self.live.len(), "resuming live workflows");
        }
        loop {
            let next = self
                .live
                .values()
                .filter_map(|w| w.next_deadline(self.opts.lease.as_millis() as u64))
                .min();
            let sleep = match next {
                Some(at) => Duration::from_millis(at.saturating_sub(caroni_types::now_ms())),
                None => Duration::from_secs(3600),
            };
            tokio::select! {
                _ = cancel.cancelled() => return,
                cmd = self.rx.recv() => match cmd {
                    Some(Cmd::Run(t, inputs, reply)) => { let _ = reply.send(self.start(&t, inputs)); }
                    Some(Cmd::Cancel(id, reply)) => { let _ = reply.send(self.cancel(id)); }
                    Some(Cmd::Deliver(msg, reply)) => { let _ = reply.send(self.deliver(msg)); }
                    None => return,
                },
                _ = tokio::time::sleep(sleep) => self.tick(),
            }
        }
    }

    fn with_ctx<R>(&self, f: impl FnOnce(&mut Ctx<'_>) -> R) -> R {
        // Time-ordered ids: jobs and requests sort by creation on every node.
        let mut gen = Uuid::now_v7;
        let mut ctx = Ctx {
            now_ms: caroni_types::now_ms(),
            lease_ms: self.opts.lease.as_millis() as u64,
            request_ttl_ms: self.opts.request_ttl.as_millis() as u64,
            endpoint: &self.opts.endpoint,
            new_id: &mut gen,
        };
        f(&mut ctx)
    }

    fn start(&mut self, template: &str, inputs: BTreeMap<String, String>) -> Result<Uuid, Error> {
        let record = templates::get(&self.store, template)?;
        let parsed = record.workflow()?;
        let id = Uuid::now_v7();
        let mut wf = Workflow::create(id, template, &parsed, inputs, caroni_types::now_ms())
            .map_err(|e| Error::BadInput(e.to_string()))?;
        let fx = self.with_ctx(|ctx| wf.start(ctx));
        tracing::info!(workflow = %id, template, "workflow created");
        self.commit(wf, None, fx).map_err(Error::Unavailable)?;
        Ok(id)
    }

    fn cancel(&mut self, id: Uuid) -> Result<(), Error> {
        let Some(mut wf) = self.live.get(&id).cloned() else {
            let wf = self
                .store
                .get(WORKFLOWS, &Key::new().uuid(&id).finish())?
                .ok_or_else(|| {
                    Error::NotFound(format!(
                        "no workflow {id}; `caroni workflow list` shows them"
                    ))
                })?;
            return Err(Error::BadInput(format!(
                "workflow {id} is already {}",
                wf.state.as_str()
            )));
        };
        let fx = self.with_ctx(|ctx| wf.cancel(ctx, "cancelled by a user"));
        tracing::info!(workflow = %id, "workflow cancelled");
        self.commit(wf, None, fx).map_err(Error::Unavailable)
    }

    fn tick(&mut self) {
        let now = caroni_types::now_ms();
        let lease = self.opts.lease.as_millis() as u64;
        let due: Vec<Uuid> = self
            .live
            .values()
            .filter(|w| w.next_deadline(lease).is_some_and(|d| d <= now))
            .map(|w| w.id)
            .collect();
        for id in due {
            let Some(mut wf) = self.live.get(&id).cloned() else {
                continue;
            };
            let before = wf.clone();
            let fx = self.with_ctx(|ctx| wf.tick(ctx));
            if wf != before {
                if let Err(e) = self.commit(wf, None, fx) {
                    tracing::error!(error = %e, "cannot persist a timer change");
                }
            }
        }
    }

    fn deliver(&mut self, msg: Inbound) -> Result<(), DeliverError> {
        match wire::is_applied(&self.store, &msg.id) {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) => return Err(DeliverError::Retry(e.to_string())),
        }
        let key = match &msg.msg {
            Msg::Offer { request_id, .. } | Msg::Decline { request_id, .. } => {
                self.by_request.get(request_id)
            }
            Msg::Accepted { job_id, .. }
            | Msg::Data {
                job_id,
                outputs: true,
                ..
            } => self.by_job.get(job_id),
            Msg::Status(s) => self.by_job.get(&s.job_id),
            other => {
                return Err(DeliverError::Refused(format!(
                    "a manager does not take {}",
                    other.name()
                )))
            }
        }
        .copied();
        let Some(mut wf) = key.and_then(|id| self.live.get(&id).cloned()) else {
            // Not a live workflow of ours: tell the agent to let go.
            let reply = match &msg.msg {
                Msg::Offer {
                    offer_id,
                    request_id,
                    ..
                } => Some(Msg::Reject {
                    offer_id: *offer_id,
                    request_id: *request_id,
                }),
                Msg::Accepted { job_id, .. } => Some(Msg::Kill {
                    job_id: *job_id,
                    reason: "no live workflow needs this job".into(),
                }),
                Msg::Status(s) if !s.state.is_final() => Some(Msg::Kill {
                    job_id: s.job_id,
                    reason: "no live workflow needs this job".into(),
                }),
                _ => None,
            };
            let mut b = Batch::default();
            let mut staged = Vec::new();
            if let Some(m) = reply {
                let out = Outbound {
                    to: msg.from.clone(),
                    endpoint: msg.endpoint.clone(),
                    msg: m,
                };
                staged.push(self.wire.stage(&mut b, &out).map_err(DeliverError::Retry)?);
            }
            wire::mark_applied(&mut b, &msg.id);
            self.store
                .write(b)
                .map_err(|e| DeliverError::Retry(e.to_string()))?;
            self.wire.notify(staged);
            return Ok(());
        };
        let refused = |e: Refusal| DeliverError::Refused(e.0);
        let fx = self.with_ctx(|ctx| -> Result<Vec<Effect>, DeliverError> {
            Ok(match &msg.msg {
                Msg::Offer {
                    offer_id,
                    request_id,
                    expires_at_ms,
                } => wf.on_offer(
                    ctx,
                    &msg.from,
                    &msg.endpoint,
                    *request_id,
                    *offer_id,
                    *expires_at_ms,
                ),
                Msg::Decline { request_id, reason } => {
                    wf.on_decline(&msg.from, *request_id, reason);
                    Vec::new()
                }
                Msg::Accepted { job_id, .. } => {
                    wf.on_accepted(ctx, &msg.from, *job_id).map_err(refused)?
                }
                Msg::Data { job_id, items, .. } => wf
                    .on_data(ctx, &msg.from, *job_id, items)
                    .map_err(refused)?,
                Msg::Status(s) => wf.on_status(ctx, &msg.from, s).map_err(refused)?,
                _ => Vec::new(),
            })
        })?;
        self.commit(wf, Some(msg.id), fx)
            .map_err(DeliverError::Retry)
    }

    /// Persists the workflow, the messages its change causes and the
    /// applied message id in one batch; then publishes and notifies.
    fn commit(
        &mut self,
        wf: Workflow,
        applied: Option<Uuid>,
        fx: Vec<Effect>,
    ) -> Result<(), String> {
        let mut b = Batch::default();
        let mut staged = Vec::new();
        let mut publish = Vec::new();
        for e in fx {
            match e {
                Effect::Send(out) => staged.push(self.wire.stage(&mut b, &out)?),
                Effect::Publish(req) => publish.push(req),
            }
        }
        b.put(WORKFLOWS, &Key::new().uuid(&wf.id).finish(), &wf);
        if let Some(id) = applied {
            wire::mark_applied(&mut b, &id);
        }
        self.store.write(b).map_err(|e| e.to_string())?;
        self.wire.notify(staged);
        for req in publish {
            self.wire.publish(req);
        }
        let id = wf.id;
        if wf.state.is_final() {
            tracing::info!(workflow = %id, state = wf.state.as_str(), message = %wf.message, "workflow finished");
            self.unindex(&wf);
            self.live.remove(&id);
        } else {
            self.index(&wf);
            self.live.insert(id, wf);
        }
        let _ = self.events.send(id);
        Ok(())
    }
}
