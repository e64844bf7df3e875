//! AgentService: job types (and, with the mesh, jobs).

use caroni_agent::job_types;
use caroni_proto::v1::{self as pb, agent_service_server::AgentService};
use caroni_store::Store;
use caroni_types::JobTypeDef;
use tonic::{Request, Response, Status};

use super::{blocking, require_role};

/// Serves the agent API.
#[derive(Clone)]
pub struct AgentApi {
    store: Store,
    enabled: bool,
}

impl AgentApi {
    /// `enabled` is false on a node without the agent role.
    pub fn new(store: Store, enabled: bool) -> Self {
        Self { store, enabled }
    }
}

/// Domain → wire.
pub fn job_type_to_pb(d: JobTypeDef) -> pb::JobType {
    pb::JobType {
        name: d.name,
        inputs: d.inputs,
        outputs: d.outputs,
        body: d.body,
        timeout_seconds: d.timeout_seconds,
        max_output_bytes: d.max_output_bytes,
        updated_at: Some(caroni_proto::timestamp_ms(d.updated_at_ms)),
    }
}

fn job_type_from_pb(j: pb::JobType) -> JobTypeDef {
    JobTypeDef {
        name: j.name,
        inputs: j.inputs,
        outputs: j.outputs,
        body: j.body,
        timeout_seconds: j.timeout_seconds,
        max_output_bytes: j.max_output_bytes,
        updated_at_ms: 0,
    }
}

#[tonic::async_trait]
impl AgentService for AgentApi {
    async fn put_job_type(
        &self,
        req: Request<pb::PutJobTypeRequest>,
    ) -> Result<Response<pb::JobType>, Status> {
        require_role(self.enabled, "agent")?;
        let req = req.into_inner();
        let def = req
            .job_type
            .map(job_type_from_pb)
            .ok_or_else(|| Status::invalid_argument("job_type is missing from the request"))?;
        let store = self.store.clone();
        let replace = req.replace;
        let def = blocking(move || job_types::put(&store, def, replace)).await?;
        tracing::info!(job_type = %def.name, replace, "job type stored");
        Ok(Response::new(job_type_to_pb(def)))
    }

    async fn list_job_types(
        &self,
        _: Request<pb::ListJobTypesRequest>,
    ) -> Result<Response<pb::ListJobTypesResponse>, Status> {
        require_role(self.enabled, "agent")?;
        let store = self.store.clone();
        let all = blocking(move || job_types::list(&store)).await?;
        Ok(Response::new(pb::ListJobTypesResponse {
            job_types: all.into_iter().map(job_type_to_pb).collect(),
        }))
    }

    async fn get_job_type(
        &self,
        req: Request<pb::GetJobTypeRequest>,
    ) -> Result<Response<pb::JobType>, Status> {
        require_role(self.enabled, "agent")?;
        let name = req.into_inner().name;
        let store = self.store.clone();
        let d = blocking(move || job_types::get(&store, &name)).await?;
        Ok(Response::new(job_type_to_pb(d)))
    }

    async fn delete_job_type(
        &self,
        req: Request<pb::DeleteJobTypeRequest>,
    ) -> Result<Response<pb::DeleteJobTypeResponse>, Status> {
        require_role(self.enabled, "agent")?;
        let name = req.into_inner().name;
        let store = self.store.clone();
        blocking(move || job_types::delete(&store, &name)).await?;
        Ok(Response::new(pb::DeleteJobTypeResponse {}))
    }
}
