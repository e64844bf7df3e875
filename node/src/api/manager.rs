//! ManagerService: templates (and, with the mesh, workflows).

use caroni_manager::templates::{self, TemplateRecord};
use caroni_proto::v1::{self as pb, manager_service_server::ManagerService};
use caroni_store::Store;
use tonic::{Request, Response, Status};

use super::{blocking, require_role};

/// Serves the manager API.
#[derive(Clone)]
pub struct ManagerApi {
    store: Store,
    enabled: bool,
}

impl ManagerApi {
    /// `enabled` is false on a node without the manager role.
    pub fn new(store: Store, enabled: bool) -> Self {
        Self { store, enabled }
    }
}

fn to_pb(r: TemplateRecord, with_text: bool) -> pb::Template {
    let wf = r.workflow().ok();
    pb::Template {
        inputs: wf
            .iter()
            .flat_map(|w| w.inputs.iter().map(|i| i.id.clone()))
            .collect(),
        outputs: wf
            .iter()
            .flat_map(|w| w.outputs.iter().map(|o| o.id.clone()))
            .collect(),
        steps: wf
            .iter()
            .flat_map(|w| {
                w.steps.iter().map(|s| pb::TemplateStep {
                    id: s.id.clone(),
                    job_type: s.job_type.clone(),
                    inputs: s.inputs.iter().map(|i| i.name.clone()).collect(),
                    outputs: s.outputs.clone(),
                })
            })
            .collect(),
        name: r.name,
        cwl: if with_text { r.cwl } else { String::new() },
        updated_at: Some(caroni_proto::timestamp_ms(r.updated_at_ms)),
    }
}

#[tonic::async_trait]
impl ManagerService for ManagerApi {
    async fn put_template(
        &self,
        req: Request<pb::PutTemplateRequest>,
    ) -> Result<Response<pb::Template>, Status> {
        require_role(self.enabled, "manager")?;
        let req = req.into_inner();
        let store = self.store.clone();
        let (record, _) = blocking(move || templates::put(&store, &req.name, &req.cwl)).await?;
        tracing::info!(template = %record.name, "template registered");
        Ok(Response::new(to_pb(record, true)))
    }

    async fn list_templates(
        &self,
        _: Request<pb::ListTemplatesRequest>,
    ) -> Result<Response<pb::ListTemplatesResponse>, Status> {
        require_role(self.enabled, "manager")?;
        let store = self.store.clone();
        let all = blocking(move || templates::list(&store)).await?;
        Ok(Response::new(pb::ListTemplatesResponse {
            templates: all.into_iter().map(|r| to_pb(r, false)).collect(),
        }))
    }

    async fn get_template(
        &self,
        req: Request<pb::GetTemplateRequest>,
    ) -> Result<Response<pb::Template>, Status> {
        require_role(self.enabled, "manager")?;
        let name = req.into_inner().name;
        let store = self.store.clone();
        let r = blocking(move || templates::get(&store, &name)).await?;
        Ok(Response::new(to_pb(r, true)))
    }

    async fn delete_template(
        &self,
        req: Request<pb::DeleteTemplateRequest>,
    ) -> Result<Response<pb::DeleteTemplateResponse>, Status> {
        require_role(self.enabled, "manager")?;
        let name = req.into_inner().name;
        let store = self.store.clone();
        blocking(move || templates::delete(&store, &name)).await?;
        Ok(Response::new(pb::DeleteTemplateResponse {}))
    }
}
