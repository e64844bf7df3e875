//! Job types stored by name. Editing one never changes a job that already
//! started: a job copies the body it runs when it starts.

use caroni_store::{keys::Key, tables, Store, Table};
use caroni_types::{ExecutorSpec, JobTypeDef};

use crate::{Error, Result};

/// Job types, by name.
pub(crate) const JOB_TYPES: Table<JobTypeDef> = Table::new(tables::JOB_TYPES, "job_types");
/// Kept apart from the definitions (whose stored form predates executors);
/// absent means bash.
const EXECUTORS: Table<ExecutorSpec> = Table::new(tables::JOB_TYPE_EXECUTORS, "job_type_executors");

/// Prices of job types that are not free (kept apart like executors).
const PRICES: Table<caroni_types::market::Price> =
    Table::new(tables::JOB_TYPE_PRICES, "job_type_prices");

fn key(name: &str) -> Vec<u8> {
    Key::new().str(name).finish()
}

/// Creates (`replace == false`) or replaces (`replace == true`) a job type
/// run by bash.
pub fn put(store: &Store, def: JobTypeDef, replace: bool) -> Result<JobTypeDef> {
    put_with(store, def, ExecutorSpec::Bash, replace).map(|(d, _)| d)
}

/// Creates or replaces a free job type with its executor, in one write.
pub fn put_with(
    store: &Store,
    def: JobTypeDef,
    executor: ExecutorSpec,
    replace: bool,
) -> Result<(JobTypeDef, ExecutorSpec)> {
    put_priced(store, def, executor, Default::default(), replace)
}

/// A job type's price (free when it has none).
pub fn price_of(store: &Store, name: &str) -> caroni_store::Result<caroni_types::market::Price> {
    Ok(store.get(PRICES, &key(name))?.unwrap_or_default())
}

/// Creates or replaces a job type with its executor and its price, in one
/// write.
pub fn put_priced(
    store: &Store,
    def: JobTypeDef,
    executor: ExecutorSpec,
    price: caroni_types::market::Price,
    replace: bool,
) -> Result<(JobTypeDef, ExecutorSpec)> {
    let mut def = def.normalize()?;
    let executor = executor
        .normalize()
        .map_err(|e| Error::BadInput(e.to_string()))?;
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
    let mut b = caroni_store::Batch::default();
    b.put(JOB_TYPES, &key(&def.name), &def);
    match &executor {
        ExecutorSpec::Bash => b.delete(EXECUTORS, &key(&def.name)),
        other => b.put(EXECUTORS, &key(&def.name), other),
    }
    if price.is_zero() {
        b.delete(PRICES, &key(&def.name));
    } else {
        b.put(PRICES, &key(&def.name), &price);
    }
    store.write(b)?;
    Ok((def, executor))
}

/// The executor of a job type (bash when it names none).
pub fn executor_of(store: &Store, name: &str) -> caroni_store::Result<ExecutorSpec> {
    Ok(store.get(EXECUTORS, &key(name))?.unwrap_or_default())
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
pub fn find(store: &Store, name: &str) -> caroni_store::Result<Option<JobTypeDef>> {
    store.get(JOB_TYPES, &key(name))
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
    b.delete(EXECUTORS, &key(name));
    b.delete(PRICES, &key(name));
    store.write(b)?;
    Ok(())
}
