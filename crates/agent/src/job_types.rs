//! Job types stored by name. Editing one never changes a job that already
//! started: a job copies the body it runs when it starts.

use caroni_store::{keys::Key, tables, Store, Table};
use caroni_types::JobTypeDef;

use crate::{Error, Result};

const JOB_TYPES: Table<JobTypeDef> = Table::new(tables::JOB_TYPES, "job_types");

fn key(name: &str) -> Vec<u8> {
    Key::new().str(name).finish()
}

/// Creates (`replace == false`) or replaces (`replace == true`) a job type.
pub fn put(store: &Store, def: JobTypeDef, replace: bool) -> Result<JobTypeDef> {
    let mut def = def.normalize()?;
    let exists = store.contains(JOB_TYPES, &key(&def.name))?;
    match (exists, replace) {
        (true, false) => {
            return Err(Error::AlreadyExists(format!(
                "job type `{}` exists already; use `caroni jobtype update FILE` to replace it",
                def.name
            )))
        }
        (false, true) => {
            return Err(Error::NotFound(format!(
                "no job type named `{}` to update; use `caroni jobtype add FILE` to create it",
                def.name
            )))
        }
        _ => {}
    }
    def.updated_at_ms = caroni_types::now_ms();
    store.put(JOB_TYPES, &key(&def.name), &def)?;
    Ok(def)
}

/// All job types, by name.
pub fn list(store: &Store) -> Result<Vec<JobTypeDef>> {
    Ok(store
        .scan(JOB_TYPES, &[])?
        .into_iter()
        .map(|(_, v)| v)
        .collect())
}

/// One job type, if it exists.
pub fn find(store: &Store, name: &str) -> Result<Option<JobTypeDef>> {
    Ok(store.get(JOB_TYPES, &key(name))?)
}

/// One job type.
pub fn get(store: &Store, name: &str) -> Result<JobTypeDef> {
    find(store, name)?.ok_or_else(|| {
        Error::NotFound(format!(
            "no job type named `{name}`; `caroni jobtype list` shows the defined ones"
        ))
    })
}

/// Removes a job type.
pub fn delete(store: &Store, name: &str) -> Result<()> {
    get(store, name)?;
    let mut b = caroni_store::Batch::default();
    b.delete(JOB_TYPES, &key(name));
    store.write(b)?;
    Ok(())
}
