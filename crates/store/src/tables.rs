//! The registry of table prefixes. A prefix is permanent: once released it
//! is never changed or reused, so that old data never decodes as new data.
//! The value types live with the crate that owns the table; the prefixes
//! live here so that two owners can never pick the same byte.

/// Node metadata (schema version, …): key = name.
pub const META: u8 = 0x01;
/// Workflow templates (manager): key = name.
pub const TEMPLATES: u8 = 0x02;
/// Job types (agent): key = name.
pub const JOB_TYPES: u8 = 0x03;
/// The executor of each job type that has one other than bash (agent):
/// key = name.
pub const JOB_TYPE_EXECUTORS: u8 = 0x04;

/// Retired (whole workflow records); read once to convert.
pub const WORKFLOWS: u8 = 0x10;
/// Retired (workflow heads with their input and output values); read once
/// to convert.
pub const WORKFLOW_HEADS: u8 = 0x14;
/// Retired (workflow steps with their values); read once to convert.
pub const WORKFLOW_STEPS: u8 = 0x15;
/// Workflow heads without values (manager): key = workflow uuid.
pub const WORKFLOW_HEADS_V3: u8 = 0x17;
/// Workflow steps without values (manager): key = workflow uuid, step
/// index (u64).
pub const WORKFLOW_STEPS_V3: u8 = 0x18;
/// Workflow values, one record each, written when set (manager): key =
/// workflow uuid, kind (u64: 0 input, 1 output, 2 step input, 3 step
/// result), step index (u64), name.
pub const WORKFLOW_VALUES: u8 = 0x19;
/// The parent of a child workflow (manager): key = workflow uuid; value
/// = parent uuid, step index, element.
pub const WORKFLOW_LINKS: u8 = 0x1A;
/// The parsed template of a workflow with dynamic steps (manager): key =
/// workflow uuid; written once.
pub const WORKFLOW_PLANS: u8 = 0x1B;
/// The elements of a dynamic step (manager): key = workflow uuid, step
/// index (u64).
pub const WORKFLOW_FANS: u8 = 0x1C;
/// Outputs of a completed element of a dynamic step (manager): key =
/// workflow uuid, step index (u64), element (u64).
pub const WORKFLOW_ELEMENTS: u8 = 0x1D;
/// The child workflow of each element (manager): key = parent uuid, step
/// index (u64), element (u64); value = child uuid.
pub const WORKFLOW_CHILDREN: u8 = 0x1E;
/// Workflow steps without values, with run times, a blocked request's
/// reason and the step's retry policy (manager): key = workflow uuid, step
/// index (u64). Steps of the 0x18 layout are converted at start.
pub const WORKFLOW_STEPS_V4: u8 = 0x1F;
/// The retry policy of each step of a stored plan, at any depth (manager):
/// key = workflow uuid. Kept apart so that plans stored before policies
/// existed are still read.
pub const WORKFLOW_PLAN_POLICIES: u8 = 0x0F;
/// What each step's job needs of an agent, by step path at any depth
/// (manager): key = workflow uuid; written only for workflows whose steps
/// need something (resources, labels). Kept apart like the policies.
pub const WORKFLOW_STEP_NEEDS: u8 = 0x0E;
/// The price an attempt's offer named, when not free (manager): key = job
/// uuid; value = the price and the most the job can cost.
pub const WORKFLOW_ATTEMPT_PRICES: u8 = 0x0D;
/// A workflow's budget and the shares of it given to element workflows
/// (manager): key = workflow uuid; only workflows with a budget.
pub const WORKFLOW_BUDGETS: u8 = 0x0C;
/// A workflow's priority when not 0 (manager): key = workflow uuid.
pub const WORKFLOW_PRIORITIES: u8 = 0x0B;
/// Submissions by client request id (manager): key = the client's request
/// id (string); value = the workflow it made and when.
pub const WORKFLOW_SUBMISSIONS: u8 = 0x11;
/// Reserved, never written (requests live in their workflow's step
/// records); kept so that the prefix is never reused.
pub const REQUESTS: u8 = 0x12;
/// Reserved, never written (jobs live in their workflow's step records);
/// kept so that the prefix is never reused.
pub const MANAGER_JOBS: u8 = 0x13;
/// Where each job runs, as its agent reported (manager): key = job uuid.
pub const MANAGER_JOB_EXECUTIONS: u8 = 0x16;

/// Offers made by the agent: key = request uuid.
pub const AGENT_OFFERS: u8 = 0x20;
/// Jobs held by the agent: key = job uuid.
pub const AGENT_JOBS: u8 = 0x21;
/// The agent's FIFO run queue: key = sequence (u64) → job uuid.
pub const AGENT_QUEUE: u8 = 0x22;
/// The workflow each offered request is for (agent): key = request uuid.
pub const AGENT_REQUEST_WORKFLOWS: u8 = 0x23;
/// Where each job runs when not under bash (agent): key = job uuid; value
/// = executor name and container name or Slurm job id.
pub const AGENT_JOB_EXECUTIONS: u8 = 0x24;
/// Jobs with their queue time and failure kind (agent): key = job uuid.
/// Jobs of the 0x21 layout are converted at start.
pub const AGENT_JOBS_V2: u8 = 0x25;
/// The price of each job type that is not free (agent): key = name.
pub const JOB_TYPE_PRICES: u8 = 0x05;
/// What an offered request's job needs (resources, labels; agent): key =
/// request uuid; written only for requests that need something.
pub const AGENT_REQUEST_NEEDS: u8 = 0x27;
/// The price an offered request's offer named and its maximum (agent;
/// only priced offers): key = request uuid.
pub const AGENT_REQUEST_PRICES: u8 = 0x28;
/// The priority of an offered request's workflow when not 0 (agent): key
/// = request uuid.
pub const AGENT_REQUEST_PRIORITIES: u8 = 0x29;
/// A job's stdout or stderr when it is at most 64 KiB (agent; longer
/// ones are files): key = job uuid, stream (u64: 1 stdout, 2 stderr).
pub const AGENT_JOB_LOGS: u8 = 0x26;

/// The ledger: receipts and verdicts, hash-chained, one chain per role
/// (agent, manager): key = role (u64), sequence (u64).
pub const LEDGER: u8 = 0x50;
/// Each job's receipt on a chain, with where it stands: key = role (u64),
/// job uuid.
pub const LEDGER_JOBS: u8 = 0x51;

/// Retired (format 1 outbox: signed envelopes as JSON); read once to convert.
pub const OUTBOX: u8 = 0x30;
/// Outbox of direct messages: key = destination node id (string), sequence
/// (u64); value = the message unsigned (signed when sent).
pub const OUTBOX_V2: u8 = 0x33;
/// Ids of inbound messages already applied: key = message uuid.
pub const APPLIED: u8 = 0x31;
/// Known peer endpoints: key = node id (string).
pub const PEERS: u8 = 0x32;

/// The blob index: key = SHA-256 (hex); value = size, when stored, when
/// last used.
pub const BLOBS: u8 = 0x40;
/// Who may read a blob from this node: key = SHA-256 (hex), node id;
/// written with the message that gave that node the reference.
pub const BLOB_GRANTS: u8 = 0x41;

#[cfg(test)]
mod tests {
    #[test]
    fn prefixes_are_distinct() {
        let all = [
            super::META,
            super::TEMPLATES,
            super::JOB_TYPES,
            super::WORKFLOWS,
            super::WORKFLOW_HEADS,
            super::WORKFLOW_STEPS,
            super::WORKFLOW_HEADS_V3,
            super::WORKFLOW_STEPS_V3,
            super::WORKFLOW_VALUES,
            super::WORKFLOW_LINKS,
            super::WORKFLOW_PLANS,
            super::WORKFLOW_FANS,
            super::WORKFLOW_ELEMENTS,
            super::WORKFLOW_CHILDREN,
            super::WORKFLOW_STEPS_V4,
            super::WORKFLOW_SUBMISSIONS,
            super::WORKFLOW_PLAN_POLICIES,
            super::WORKFLOW_STEP_NEEDS,
            super::WORKFLOW_ATTEMPT_PRICES,
            super::WORKFLOW_BUDGETS,
            super::WORKFLOW_PRIORITIES,
            super::AGENT_JOBS_V2,
            super::AGENT_JOB_LOGS,
            super::AGENT_REQUEST_NEEDS,
            super::AGENT_REQUEST_PRICES,
            super::AGENT_REQUEST_PRIORITIES,
            super::JOB_TYPE_PRICES,
            super::JOB_TYPE_EXECUTORS,
            super::MANAGER_JOB_EXECUTIONS,
            super::AGENT_JOB_EXECUTIONS,
            super::REQUESTS,
            super::BLOBS,
            super::BLOB_GRANTS,
            super::MANAGER_JOBS,
            super::AGENT_OFFERS,
            super::AGENT_JOBS,
            super::AGENT_QUEUE,
            super::AGENT_REQUEST_WORKFLOWS,
            super::OUTBOX,
            super::OUTBOX_V2,
            super::APPLIED,
            super::PEERS,
            super::LEDGER,
            super::LEDGER_JOBS,
        ];
        let set: std::collections::BTreeSet<_> = all.iter().collect();
        assert_eq!(set.len(), all.len());
    }
}
