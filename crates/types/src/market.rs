//! The market's vocabulary: what an agent has and advertises (resources,
//! labels, the job types it serves), and what a request needs. Plain data
//! and pure checks; the rules that use them live in the engines
//! (docs/market.md).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::delivery::Refusal;
use crate::msg::Load;

/// Amounts of resources: what an agent has, what is free on it, or what a
/// job needs. A zero means "none" for what an agent has and "nothing" for
/// what a job needs.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Resources {
    /// Thousandths of a CPU.
    pub cpu_milli: u64,
    /// Memory, in MiB.
    pub memory_mib: u64,
    /// GPUs.
    pub gpus: u32,
    /// Scratch disk, in MiB.
    pub disk_mib: u64,
}

impl Resources {
    /// True when nothing is asked.
    pub fn is_zero(&self) -> bool {
        *self == Self::default()
    }

    /// The first amount in `self` that `have` cannot give, as a sentence
    /// part ("4 CPUs, the agent has 2"), or `None` when it fits.
    pub fn shortfall(&self, have: &Resources, what: &str) -> Option<String> {
        if self.cpu_milli > have.cpu_milli {
            return Some(format!(
                "{} CPUs, {what} {}",
                cpus(self.cpu_milli),
                cpus(have.cpu_milli)
            ));
        }
        if self.memory_mib > have.memory_mib {
            return Some(format!(
                "{} MiB of memory, {what} {} MiB",
                self.memory_mib, have.memory_mib
            ));
        }
        if self.gpus > have.gpus {
            return Some(format!("{} GPUs, {what} {}", self.gpus, have.gpus));
        }
        if self.disk_mib > have.disk_mib {
            return Some(format!(
                "{} MiB of disk, {what} {} MiB",
                self.disk_mib, have.disk_mib
            ));
        }
        None
    }

    /// True when `self` fits in `have`.
    pub fn fits(&self, have: &Resources) -> bool {
        self.shortfall(have, "").is_none()
    }

    /// `self + other`, saturating.
    pub fn plus(&self, other: &Resources) -> Resources {
        Resources {
            cpu_milli: self.cpu_milli.saturating_add(other.cpu_milli),
            memory_mib: self.memory_mib.saturating_add(other.memory_mib),
            gpus: self.gpus.saturating_add(other.gpus),
            disk_mib: self.disk_mib.saturating_add(other.disk_mib),
        }
    }

    /// `self - other`, saturating at zero.
    pub fn minus(&self, other: &Resources) -> Resources {
        Resources {
            cpu_milli: self.cpu_milli.saturating_sub(other.cpu_milli),
            memory_mib: self.memory_mib.saturating_sub(other.memory_mib),
            gpus: self.gpus.saturating_sub(other.gpus),
            disk_mib: self.disk_mib.saturating_sub(other.disk_mib),
        }
    }

    /// Short text: `2 CPUs, 512 MiB, 1 GPU, 10240 MiB disk` (zeros left
    /// out; `nothing` when all are zero).
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if self.cpu_milli > 0 {
            parts.push(format!("{} CPUs", cpus(self.cpu_milli)));
        }
        if self.memory_mib > 0 {
            parts.push(format!("{} MiB", self.memory_mib));
        }
        if self.gpus > 0 {
            parts.push(format!("{} GPUs", self.gpus));
        }
        if self.disk_mib > 0 {
            parts.push(format!("{} MiB disk", self.disk_mib));
        }
        if parts.is_empty() {
            "nothing".into()
        } else {
            parts.join(", ")
        }
    }
}

/// `1500` → `1.5`.
pub fn cpus(milli: u64) -> String {
    if milli.is_multiple_of(1000) {
        (milli / 1000).to_string()
    } else {
        format!("{}", milli as f64 / 1000.0)
    }
}

/// What a step asks of the agent that runs it, beyond the job type: the
/// resources its job holds while it runs, and labels the agent must carry.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Needs {
    /// Resources held while the job runs.
    pub resources: Resources,
    /// Labels the agent must carry, each with exactly this value.
    pub labels: BTreeMap<String, String>,
    /// The most one attempt may cost (thousandths of a credit), when the
    /// template says (`CaroniMaxPrice`); travels as the request's
    /// `max_charge_milli`.
    #[serde(default)]
    pub max_price_milli: Option<u64>,
}

impl Needs {
    /// True when nothing is asked.
    pub fn is_empty(&self) -> bool {
        self.resources.is_zero() && self.labels.is_empty() && self.max_price_milli.is_none()
    }

    /// Why an agent with `total` resources and `labels` can never serve
    /// these needs, or `None` when it can (perhaps later, when busy).
    pub fn unmet(&self, total: &Resources, labels: &BTreeMap<String, String>) -> Option<String> {
        for (k, v) in &self.labels {
            match labels.get(k) {
                Some(have) if have == v => {}
                Some(have) => {
                    return Some(format!("label {k}={v} wanted, the agent has {k}={have}"))
                }
                None => return Some(format!("label {k}={v} wanted, the agent has no label {k}")),
            }
        }
        self.resources
            .shortfall(total, "the agent has")
            .map(|s| format!("needs {s}"))
    }
}

/// What a job of a job type costs, in thousandths of a credit (an
/// abstract unit): a fixed part and a part per second of run time. Zero
/// by default.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Price {
    /// Charged once per job that ran.
    pub fixed_milli: u64,
    /// Charged per second of run time (started, each second rounded up).
    pub per_second_milli: u64,
}

impl Price {
    /// True when free.
    pub fn is_zero(&self) -> bool {
        self.fixed_milli == 0 && self.per_second_milli == 0
    }

    /// The most a job can cost: it is stopped at its timeout.
    pub fn max_charge(&self, timeout_seconds: u32) -> u64 {
        self.fixed_milli.saturating_add(
            self.per_second_milli
                .saturating_mul(u64::from(timeout_seconds)),
        )
    }

    /// What a job that ran `run_ms` costs, never more than `max`.
    pub fn charge(&self, run_ms: u64, max: u64) -> u64 {
        self.fixed_milli
            .saturating_add(self.per_second_milli.saturating_mul(run_ms.div_ceil(1000)))
            .min(max)
    }

    /// `1.5 + 0.01/s`, or `free`.
    pub fn describe(&self) -> String {
        match (self.fixed_milli, self.per_second_milli) {
            (0, 0) => "free".into(),
            (f, 0) => credits(f),
            (0, p) => format!("{}/s", credits(p)),
            (f, p) => format!("{} + {}/s", credits(f), credits(p)),
        }
    }
}

/// Thousandths of a credit as text: `1500` → `1.5`.
pub fn credits(milli: u64) -> String {
    if milli.is_multiple_of(1000) {
        (milli / 1000).to_string()
    } else {
        let s = format!("{}.{:03}", milli / 1000, milli % 1000);
        s.trim_end_matches('0').to_string()
    }
}

/// Parses credits (`1.5`, `0.001`, `12`) into thousandths; at most three
/// decimals, not negative.
pub fn parse_credits(s: &str) -> Result<u64, String> {
    let bad =
        || format!("`{s}` is not an amount of credits such as 2 or 0.25 (at most 3 decimals)");
    let t = s.trim();
    let (whole, frac) = t.split_once('.').unwrap_or((t, ""));
    if whole.is_empty() && frac.is_empty() || frac.len() > 3 {
        return Err(bad());
    }
    if !whole.chars().all(|c| c.is_ascii_digit()) || !frac.chars().all(|c| c.is_ascii_digit()) {
        return Err(bad());
    }
    let w: u64 = if whole.is_empty() {
        0
    } else {
        whole.parse().map_err(|_| bad())?
    };
    let f: u64 = format!("{frac:0<3}").parse().map_err(|_| bad())?;
    w.checked_mul(1000)
        .and_then(|w| w.checked_add(f))
        .ok_or_else(bad)
}

/// One job type as an agent advertises it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdvertisedType {
    /// Its name.
    pub name: String,
    /// Its input names, sorted.
    pub inputs: Vec<String>,
    /// Its price.
    #[serde(default)]
    pub price: Price,
    /// Its timeout: no job runs longer (so costs at most
    /// [`Price::max_charge`]).
    #[serde(default)]
    pub max_seconds: u32,
}

/// What an agent tells every manager, signed, on gossip: the job types it
/// serves and for whom, what it has, how busy it is. Sent periodically and
/// when it changes; a newer `seq` from the same agent replaces an older.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Advert {
    /// Grows with every advert of this agent (its clock in ms at
    /// publication, so a restart continues upwards).
    pub seq: u64,
    /// Void after this instant (ms since the epoch).
    pub expires_at_ms: u64,
    /// How busy it is.
    pub load: Load,
    /// What it has in all.
    pub total: Resources,
    /// What is not held by running jobs.
    pub free: Resources,
    /// Its labels (`region=eu`).
    pub labels: BTreeMap<String, String>,
    /// The job types it serves.
    pub job_types: Vec<AdvertisedType>,
    /// True when it runs real CWL tools (`--cwl-tools`).
    pub cwl_tools: bool,
    /// The managers it serves (`--serve-managers`); empty: every one.
    pub serves: Vec<String>,
}

/// Most job types, labels or managers in one advert.
pub const MAX_ADVERT_ITEMS: usize = 512;
/// Longest a label key or value.
pub const MAX_LABEL_BYTES: usize = 128;
/// Furthest an advert may expire in the future.
const MAX_ADVERT_LIFETIME_MS: u64 = 10 * 60 * 1000;

impl Advert {
    /// Checks what no honest agent would send (absurd sizes, bad names,
    /// an expiry in the past or far ahead); a manager drops such an
    /// advert.
    pub fn check(&self, now_ms: u64) -> Result<(), Refusal> {
        if self.job_types.len() > MAX_ADVERT_ITEMS
            || self.labels.len() > MAX_ADVERT_ITEMS
            || self.serves.len() > MAX_ADVERT_ITEMS
        {
            return Err(Refusal(format!(
                "more than {MAX_ADVERT_ITEMS} job types, labels or managers"
            )));
        }
        for t in &self.job_types {
            crate::validate_env_name(&t.name).map_err(|e| Refusal(format!("job type {e}")))?;
            if t.inputs.len() > 256 {
                return Err(Refusal(format!("job type {} has over 256 inputs", t.name)));
            }
            for i in &t.inputs {
                crate::validate_env_name(i)
                    .map_err(|e| Refusal(format!("job type {}: input {e}", t.name)))?;
            }
        }
        for (k, v) in &self.labels {
            check_label(k, v).map_err(Refusal)?;
        }
        if self.serves.iter().any(|s| s.len() > 128) {
            return Err(Refusal("a served manager's id is over 128 bytes".into()));
        }
        if self.expires_at_ms <= now_ms {
            return Err(Refusal("it has expired".into()));
        }
        if self.expires_at_ms - now_ms > MAX_ADVERT_LIFETIME_MS {
            return Err(Refusal("it expires more than 10 minutes from now".into()));
        }
        Ok(())
    }

    /// The advertised job type that a request for `job_type` with these
    /// input names would get, or why not (a sentence part).
    pub fn serves_type(&self, job_type: &str, inputs: &[String]) -> Result<(), String> {
        if job_type == crate::CWL_TOOL_JOB_TYPE {
            return if self.cwl_tools {
                Ok(())
            } else {
                Err("runs no CWL tools (--cwl-tools)".into())
            };
        }
        let Some(t) = self.job_types.iter().find(|t| t.name == job_type) else {
            return Err(format!("no job type named {job_type}"));
        };
        let mut want = inputs.to_vec();
        want.sort();
        if t.inputs != want {
            return Err(format!(
                "job type {job_type} takes inputs [{}], the step gives [{}]",
                t.inputs.join(", "),
                want.join(", ")
            ));
        }
        Ok(())
    }

    /// True when it serves manager `node`.
    pub fn serves_manager(&self, node: &str) -> bool {
        self.serves.is_empty() || self.serves.iter().any(|s| s == node)
    }
}

/// Checks a label: a key of letters, digits, `.`, `_`, `-` and `/`, a value
/// without control characters, each at most [`MAX_LABEL_BYTES`].
pub fn check_label(k: &str, v: &str) -> Result<(), String> {
    if k.is_empty()
        || k.len() > MAX_LABEL_BYTES
        || !k
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/'))
    {
        return Err(format!(
            "label key `{k}` must be 1 to {MAX_LABEL_BYTES} letters, digits, `.`, `_`, `-` or `/`"
        ));
    }
    if v.len() > MAX_LABEL_BYTES || v.chars().any(char::is_control) {
        return Err(format!(
            "label `{k}`: its value must be at most {MAX_LABEL_BYTES} bytes without control characters"
        ));
    }
    Ok(())
}

/// Parses `key=value` (a label on the command line).
pub fn parse_label(s: &str) -> Result<(String, String), String> {
    let Some((k, v)) = s.split_once('=') else {
        return Err(format!("label `{s}` is not key=value (example: region=eu)"));
    };
    check_label(k, v)?;
    Ok((k.to_string(), v.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn res(cpu: u64, mem: u64, gpus: u32) -> Resources {
        Resources {
            cpu_milli: cpu,
            memory_mib: mem,
            gpus,
            disk_mib: 0,
        }
    }

    #[test]
    fn needs_say_which_resource_or_label_is_missing() {
        let labels = BTreeMap::from([("region".to_string(), "eu".to_string())]);
        let mut n = Needs {
            resources: res(4000, 0, 0),
            labels: BTreeMap::new(),
            max_price_milli: None,
        };
        assert_eq!(
            n.unmet(&res(2000, 100, 0), &labels).as_deref(),
            Some("needs 4 CPUs, the agent has 2")
        );
        assert_eq!(n.unmet(&res(4000, 100, 0), &labels), None);
        n.labels.insert("region".into(), "us".into());
        assert_eq!(
            n.unmet(&res(4000, 100, 0), &labels).as_deref(),
            Some("label region=us wanted, the agent has region=eu")
        );
        n.labels = BTreeMap::from([("gpu".to_string(), "a100".to_string())]);
        assert_eq!(
            n.unmet(&res(4000, 100, 0), &labels).as_deref(),
            Some("label gpu=a100 wanted, the agent has no label gpu")
        );
    }

    #[test]
    fn adverts_name_what_a_request_lacks() {
        let a = Advert {
            job_types: vec![AdvertisedType {
                name: "wc".into(),
                inputs: vec!["a".into(), "b".into()],
                price: Price::default(),
                max_seconds: 60,
            }],
            ..Advert::default()
        };
        assert!(a.serves_type("wc", &["b".into(), "a".into()]).is_ok());
        assert_eq!(
            a.serves_type("wc", &["a".into()])
                .expect_err("other inputs"),
            "job type wc takes inputs [a, b], the step gives [a]"
        );
        assert_eq!(
            a.serves_type("x", &[]).expect_err("no such type"),
            "no job type named x"
        );
        assert!(a.serves_manager("anyone"));
    }

    #[test]
    fn prices_charge_started_seconds_up_to_their_maximum() {
        let p = Price {
            fixed_milli: 500,
            per_second_milli: 10,
        };
        assert_eq!(p.max_charge(60), 1100);
        assert_eq!(p.charge(1, 1100), 510);
        assert_eq!(p.charge(2500, 1100), 530);
        assert_eq!(p.charge(3_600_000, 1100), 1100);
        assert_eq!(p.describe(), "0.5 + 0.01/s");
        assert_eq!(credits(1500), "1.5");
        assert_eq!(credits(2000), "2");
        assert_eq!(parse_credits("1.5"), Ok(1500));
        assert_eq!(parse_credits("0.001"), Ok(1));
        assert_eq!(parse_credits(".25"), Ok(250));
        assert!(parse_credits("-1").is_err());
        assert!(parse_credits("0.0001").is_err());
        assert!(parse_credits("abc").is_err());
    }

    #[test]
    fn absurd_adverts_are_refused() {
        let now = 1_000_000;
        let ok = Advert {
            expires_at_ms: now + 30_000,
            ..Advert::default()
        };
        assert!(ok.check(now).is_ok());
        let mut far = ok.clone();
        far.expires_at_ms = now + 3_600_000;
        assert!(far.check(now).is_err());
        let mut bad = ok.clone();
        bad.labels.insert("a b".into(), "x".into());
        assert!(bad.check(now).is_err());
        assert!(parse_label("region=eu").is_ok());
        assert!(parse_label("region").is_err());
    }
}

/// What a whole workflow may spend (`CaroniBudget`), its element
/// workflows included.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Budget {
    /// The most it may spend, in thousandths of a credit.
    pub limit_milli: u64,
    /// True: a step that cannot be placed within what is left fails the
    /// workflow at once; false: it waits (shown as blocked) until running
    /// jobs end and free what they reserved, or `--unplaceable-timeout`.
    pub fail_when_exhausted: bool,
}
