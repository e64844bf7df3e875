//! What a step needs of the agent that runs it (docs/market.md): CWL's
//! `ResourceRequirement` (`coresMin`, `ramMin`, `outdirMin` + `tmpdirMin`,
//! numbers only: an expression is known only when the tool runs, so it
//! does not steer placement) and the Caroni keys `CaroniCpus`,
//! `CaroniMemory`, `CaroniGpus`, `CaroniDisk`, `CaroniLabels` and
//! `CaroniMaxPrice` (the most one attempt may cost, in credits), on the
//! workflow, the tool or the step; what the step says wins, field by
//! field, over its tool, and the tool over the workflow.

use std::collections::BTreeMap;

use caroni_types::market::{Needs, Resources};
use serde_yaml_ng::{Mapping, Value};

use super::{is_caroni, requirement_entries, scalar_string};
use crate::{get, invalid, Error};

/// The Caroni keys of needs (allowed on a workflow, a step and a tool).
pub(super) const KEYS: [&str; 6] = [
    "CaroniCpus",
    "CaroniMemory",
    "CaroniGpus",
    "CaroniDisk",
    "CaroniLabels",
    "CaroniMaxPrice",
];

/// Needs as one place states them: unsaid fields are `None`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Partial {
    cpu_milli: Option<u64>,
    memory_mib: Option<u64>,
    gpus: Option<u32>,
    disk_mib: Option<u64>,
    labels: BTreeMap<String, String>,
    max_price_milli: Option<u64>,
}

impl Partial {
    /// `self` where it says something, else `base`.
    pub(crate) fn over(&self, base: &Partial) -> Partial {
        let mut labels = base.labels.clone();
        labels.extend(self.labels.clone());
        Partial {
            cpu_milli: self.cpu_milli.or(base.cpu_milli),
            memory_mib: self.memory_mib.or(base.memory_mib),
            gpus: self.gpus.or(base.gpus),
            disk_mib: self.disk_mib.or(base.disk_mib),
            labels,
            max_price_milli: self.max_price_milli.or(base.max_price_milli),
        }
    }

    /// The needs, unsaid fields being zero.
    pub(crate) fn needs(&self) -> Needs {
        Needs {
            resources: Resources {
                cpu_milli: self.cpu_milli.unwrap_or(0),
                memory_mib: self.memory_mib.unwrap_or(0),
                gpus: self.gpus.unwrap_or(0),
                disk_mib: self.disk_mib.unwrap_or(0),
            },
            labels: self.labels.clone(),
            max_price_milli: self.max_price_milli,
        }
    }
}

/// A plain number, not an expression.
fn number(v: &Value) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) if !s.contains('$') => s.trim().parse().ok(),
        _ => None,
    }
    .filter(|f| f.is_finite() && *f >= 0.0)
}

/// A size: MiB as a number, or text such as `512m`, `2g`.
fn mib(v: &Value, at: &str) -> Result<u64, Error> {
    if let Some(f) = number(v) {
        return Ok(f.ceil() as u64);
    }
    scalar_string(v)
        .and_then(|s| caroni_types::parse_memory(&s).ok())
        .map(|b| b.div_ceil(1 << 20))
        .ok_or_else(|| invalid(at, "must be MiB as a number, or a size such as 512m or 2g"))
}

/// What the requirements and hints of one mapping (a workflow, a step, a
/// tool) say.
pub(super) fn of(holder: &Mapping, at: &str) -> Result<Partial, Error> {
    let mut resource = Partial::default();
    let mut caroni = Partial::default();
    for (class, body, rat) in requirement_entries(holder, at)? {
        if class == "ResourceRequirement" || class.ends_with("#ResourceRequirement") {
            let pick = |min: &str, max: &str| {
                get(body, min)
                    .and_then(number)
                    .or_else(|| get(body, max).and_then(number))
            };
            if let Some(c) = pick("coresMin", "coresMax") {
                resource.cpu_milli = Some((c * 1000.0).ceil() as u64);
            }
            if let Some(r) = pick("ramMin", "ramMax") {
                resource.memory_mib = Some(r.ceil() as u64);
            }
            let out = pick("outdirMin", "outdirMax");
            let tmp = pick("tmpdirMin", "tmpdirMax");
            if out.is_some() || tmp.is_some() {
                resource.disk_mib = Some((out.unwrap_or(0.0) + tmp.unwrap_or(0.0)).ceil() as u64);
            }
        }
        if !is_caroni(&class) {
            continue;
        }
        if let Some(v) = get(body, "CaroniCpus") {
            let c = number(v)
                .filter(|c| *c > 0.0 && *c <= 65_536.0)
                .ok_or_else(|| {
                    invalid(
                        format!("{rat}.CaroniCpus"),
                        "must be a number of CPUs above 0 (1.5 allowed)",
                    )
                })?;
            caroni.cpu_milli = Some((c * 1000.0).ceil() as u64);
        }
        if let Some(v) = get(body, "CaroniMemory") {
            caroni.memory_mib = Some(mib(v, &format!("{rat}.CaroniMemory"))?);
        }
        if let Some(v) = get(body, "CaroniDisk") {
            caroni.disk_mib = Some(mib(v, &format!("{rat}.CaroniDisk"))?);
        }
        if let Some(v) = get(body, "CaroniGpus") {
            let g = scalar_string(v)
                .and_then(|s| s.parse::<u32>().ok())
                .filter(|g| *g <= 1024)
                .ok_or_else(|| {
                    invalid(
                        format!("{rat}.CaroniGpus"),
                        "must be a whole number of GPUs (label their kind with CaroniLabels: {gpu: a100})",
                    )
                })?;
            caroni.gpus = Some(g);
        }
        if let Some(v) = get(body, "CaroniMaxPrice") {
            let text = scalar_string(v).unwrap_or_default();
            caroni.max_price_milli =
                Some(caroni_types::market::parse_credits(&text).map_err(|e| {
                    invalid(
                        format!("{rat}.CaroniMaxPrice"),
                        format!("the most one attempt may cost: {e}"),
                    )
                })?);
        }
        match get(body, "CaroniLabels") {
            None | Some(Value::Null) => {}
            Some(Value::Mapping(m)) => {
                for (k, v) in m {
                    let (Some(k), Some(v)) = (scalar_string(k), scalar_string(v)) else {
                        return Err(invalid(
                            format!("{rat}.CaroniLabels"),
                            "keys and values must be scalars (region: eu)",
                        ));
                    };
                    caroni_types::market::check_label(&k, &v)
                        .map_err(|e| invalid(format!("{rat}.CaroniLabels.{k}"), e))?;
                    caroni.labels.insert(k, v);
                }
            }
            Some(_) => {
                return Err(invalid(
                    format!("{rat}.CaroniLabels"),
                    "must be a mapping of label: value (region: eu)",
                ))
            }
        }
    }
    // The Caroni keys say more precisely what Caroni should do.
    Ok(caroni.over(&resource))
}

/// `CaroniBudget`: credits (`10`, `2.5`), or `{credits: 10, exhausted:
/// fail}` (`wait`, the default, lets a step wait for running jobs to free
/// what they reserved).
pub(super) fn budget(v: &Value, at: &str) -> Result<caroni_types::market::Budget, Error> {
    let credits = |v: &Value, at: &str| {
        let text = scalar_string(v).unwrap_or_default();
        caroni_types::market::parse_credits(&text)
            .map_err(|e| invalid(at, format!("what the whole workflow may spend: {e}")))
    };
    match v {
        Value::Mapping(m) => {
            for k in m.keys() {
                let k = scalar_string(k).unwrap_or_default();
                if k != "credits" && k != "exhausted" {
                    return Err(invalid(
                        format!("{at}.{k}"),
                        format!("unknown key `{k}`; the keys are credits and exhausted"),
                    ));
                }
            }
            let limit_milli = match get(m, "credits") {
                Some(c) => credits(c, &format!("{at}.credits"))?,
                None => return Err(invalid(at, "missing credits (CaroniBudget: {credits: 10})")),
            };
            let fail_when_exhausted = match get(m, "exhausted").and_then(scalar_string).as_deref() {
                None | Some("wait") => false,
                Some("fail") => true,
                Some(other) => {
                    return Err(invalid(
                        format!("{at}.exhausted"),
                        format!("is `{other}`; give wait (a step waits for running jobs to free what they reserved) or fail"),
                    ))
                }
            };
            Ok(caroni_types::market::Budget {
                limit_milli,
                fail_when_exhausted,
            })
        }
        _ => Ok(caroni_types::market::Budget {
            limit_milli: credits(v, at)?,
            fail_when_exhausted: false,
        }),
    }
}
