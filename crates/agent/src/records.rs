//! The agent's tables of jobs and offers, in one place: the service and
//! the executors read and write them through these (job types have their
//! own module, [`crate::job_types`]).

use caroni_store::{tables, Table};
use uuid::Uuid;

use crate::executor::Execution;
use crate::machine::{Job, Offer};

/// Offers made, by request.
pub(crate) const OFFERS: Table<Offer> = Table::new(tables::AGENT_OFFERS, "agent_offers");
/// Jobs held, by job id.
pub(crate) const JOBS: Table<Job> = Table::new(tables::AGENT_JOBS, "agent_jobs");
/// Where each job runs (executor and container name or Slurm job id).
pub(crate) const EXECUTIONS: Table<Execution> =
    Table::new(tables::AGENT_JOB_EXECUTIONS, "agent_job_executions");
/// The workflow each offered request is for, as its manager said (kept
/// with the jobs; a request from a manager that does not say has none).
pub(crate) const REQUEST_WORKFLOWS: Table<Uuid> =
    Table::new(tables::AGENT_REQUEST_WORKFLOWS, "agent_request_workflows");
