//! Jobs' logs between the nodes: an agent serves the logs it keeps
//! ([`caroni_agent::logs`]) to each job's manager over the peer port
//! (`PeerService.ReadLog`, a read signed by the manager) and to its own
//! operator over the client API; a manager reads them on demand from the
//! agent that ran an attempt, or in process when that agent is itself.

use std::sync::Arc;

use caroni_agent::logs::{JobLogs, Stream};
use caroni_proto::v1::LogPiece;
use tonic::Status;
use uuid::Uuid;

/// An agent's logs, readable by each job's manager.
#[derive(Clone)]
pub struct AgentLogs {
    /// The agent's jobs (who owns each, whether it has ended).
    pub agent: caroni_agent::service::Handle,
    /// Where it keeps their logs.
    pub logs: JobLogs,
}

/// `stdout` or `stderr`, as a client or a peer wrote it.
pub fn stream_named(name: &str) -> Result<Stream, Status> {
    match name {
        "stdout" => Ok(Stream::Stdout),
        "stderr" => Ok(Stream::Stderr),
        other => Err(Status::invalid_argument(format!(
            "`{}` is not a log: ask for stdout or stderr",
            other.chars().take(32).collect::<String>()
        ))),
    }
}

/// The logs a client asked for: `stdout`, `stderr`, or both when empty.
pub fn streams_asked(name: &str) -> Result<&'static [&'static str], Status> {
    match name {
        "" => Ok(&["stdout", "stderr"]),
        "stdout" => Ok(&["stdout"]),
        "stderr" => Ok(&["stderr"]),
        other => Err(Status::invalid_argument(format!(
            "`{}` is not a log: ask for stdout, stderr, or leave it empty for both",
            other.chars().take(32).collect::<String>()
        ))),
    }
}

/// A boxed stream of results.
pub type Boxed<T> = std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<T, Status>> + Send>>;

/// Several logs as one stream, their pieces as they come.
pub fn merged<T: Send + 'static>(streams: Vec<Boxed<T>>) -> Boxed<T> {
    Box::pin(futures::stream::select_all(streams))
}

impl AgentLogs {
    /// Log `stream` of `job` from `offset`, whoever asks (the agent's own
    /// operator).
    pub fn open(
        &self,
        job: Uuid,
        stream: Stream,
        offset: u64,
        follow: bool,
    ) -> Result<caroni_peer::server::LogStream, Status> {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let (logs, agent) = (self.logs.clone(), self.agent.clone());
        tokio::spawn(async move {
            let ended = move || {
                agent
                    .get_job(job)
                    .ok()
                    .flatten()
                    .is_none_or(|j| j.state.is_final())
            };
            logs.read(job, stream, offset, follow, ended, tx).await;
        });
        let pieces = tokio_stream::wrappers::ReceiverStream::new(rx);
        Ok(Box::pin(tokio_stream::StreamExt::map(pieces, |p| {
            p.map(|p| LogPiece {
                offset: p.offset,
                data: p.data,
            })
            .map_err(|e| Status::unavailable(format!("cannot read the log: {e}")))
        })))
    }

    /// The job, or NOT_FOUND.
    pub fn job(&self, job: Uuid) -> Result<caroni_agent::machine::Job, Status> {
        self.agent
            .get_job(job)
            .map_err(|e| Status::unavailable(e.to_string()))?
            .ok_or_else(|| {
                Status::not_found(format!(
                    "no job {job} on this agent (it may have been deleted after --retention)"
                ))
            })
    }
}

impl caroni_peer::LogSource for AgentLogs {
    fn read(
        &self,
        reader: &str,
        job: Uuid,
        stream: &str,
        offset: u64,
        follow: bool,
    ) -> Result<caroni_peer::server::LogStream, Status> {
        let stream = stream_named(stream)?;
        let held = self.job(job)?;
        if held.manager != reader {
            return Err(Status::permission_denied(format!(
                "job {job} belongs to another manager: only its own manager may read its logs"
            )));
        }
        self.open(job, stream, offset, follow)
    }
}

/// Shared, as the peer server and the APIs hold it.
pub type SharedLogs = Option<Arc<AgentLogs>>;
