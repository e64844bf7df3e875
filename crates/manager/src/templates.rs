//! Workflow templates: validated CWL documents stored by name.

use caroni_store::{keys::Key, tables, Store, Table};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// A stored template.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateRecord {
    /// Name.
    pub name: String,
    /// The CWL text as registered.
    pub cwl: String,
    /// Milliseconds since the Unix epoch of the last change.
    pub updated_at_ms: u64,
}

impl TemplateRecord {
    /// The parsed workflow. Stored documents were validated when registered,
    /// but are parsed again so that a parser change can never run a document
    /// it would now refuse.
    pub fn workflow(&self) -> Result<caroni_cwl::Workflow> {
        Ok(caroni_cwl::parse(&self.cwl)?)
    }
}

const TEMPLATES: Table<TemplateRecord> = Table::new(tables::TEMPLATES, "templates");

fn key(name: &str) -> Vec<u8> {
    Key::new().str(name).finish()
}

/// Validates and stores (or replaces) a template; returns it with its parse.
pub fn put(store: &Store, name: &str, cwl: &str) -> Result<(TemplateRecord, caroni_cwl::Workflow)> {
    caroni_types::validate_template_name(name)?;
    let workflow = caroni_cwl::parse(cwl)?;
    let record = TemplateRecord {
        name: name.to_string(),
        cwl: cwl.to_string(),
        updated_at_ms: caroni_types::now_ms(),
    };
    store.put(TEMPLATES, &key(name), &record)?;
    Ok((record, workflow))
}

/// All templates, by name.
pub fn list(store: &Store) -> Result<Vec<TemplateRecord>> {
    Ok(store
        .scan(TEMPLATES, &[])?
        .into_iter()
        .map(|(_, v)| v)
        .collect())
}

/// One template.
pub fn get(store: &Store, name: &str) -> Result<TemplateRecord> {
    store.get(TEMPLATES, &key(name))?.ok_or_else(|| {
        Error::NotFound(format!(
            "no template named `{name}`; `caroni template list` shows the registered ones"
        ))
    })
}

/// Removes a template.
pub fn delete(store: &Store, name: &str) -> Result<()> {
    get(store, name)?;
    let mut b = caroni_store::Batch::default();
    b.delete(TEMPLATES, &key(name));
    store.write(b)?;
    Ok(())
}
