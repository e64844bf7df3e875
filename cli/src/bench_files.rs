//! The file workload of `caroni bench` (`--file-size`): each workflow
//! passes its own file (distinct content, so that no transfer is skipped
//! because a node already holds the bytes) through a K-step chain of
//! `cat`-like jobs. Each step copies its input, appends one line and
//! declares the copy as its File output, so every hop moves the whole file
//! twice over the peer port: manager → agent (the input), agent → manager
//! (the output). The floor is measured in the same run on the same disk:
//! `cp` of the file and `sha256sum` of the copy.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context as _;
use tonic::transport::Channel;

/// The job type of the file chain.
pub const JOB_TYPE: &str = "bench_file_step";
/// The template of the file chain.
pub const TEMPLATE: &str = "bench_file_chain";

/// The job body: a copy of the input with one more line.
pub fn body() -> String {
    r#"cat "$CARONI_FILE_x" > out && echo "$CARONI_JOB_ID" >> out && printf '{"out":{"class":"File","path":"out"}}'"#.to_string()
}

/// The K-step chain over files: x → s1 → … → sK → result.
pub fn template(steps: usize) -> String {
    let mut cwl = format!(
        "cwlVersion: v1.2\nclass: Workflow\ninputs:\n  x: File\noutputs:\n  result:\n    type: File\n    outputSource: s{steps}/out\nsteps:\n"
    );
    for k in 1..=steps {
        let source = if k == 1 {
            "x".to_string()
        } else {
            format!("s{}/out", k - 1)
        };
        cwl.push_str(&format!(
            "  s{k}:\n    run:\n      class: CommandLineTool\n      inputs:\n        x: File\n      outputs:\n        out: File\n    hints:\n      CaroniRequirement:\n        CaroniJobName: {JOB_TYPE}\n    in:\n      x: {source}\n    out: [out]\n"
        ));
    }
    cwl
}

/// Writes `size` bytes that differ for each `seed` (xorshift, 1 MiB at a
/// time: nothing is held whole).
fn write_file(path: &Path, size: u64, seed: u64) -> anyhow::Result<()> {
    let mut f = std::io::BufWriter::new(
        std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?,
    );
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut left = size;
    let mut buf = vec![0u8; 1 << 20];
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        for chunk in buf[..n].chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let b = x.to_le_bytes();
            chunk.copy_from_slice(&b[..chunk.len()]);
        }
        f.write_all(&buf[..n])?;
        left -= n as u64;
    }
    f.flush()?;
    Ok(())
}

/// Files made and uploaded for a run, one per workflow.
pub struct Prepared {
    /// Each workflow's inputs (`x` = its file's reference).
    pub inputs: Vec<BTreeMap<String, String>>,
    /// Seconds the uploads took in all.
    pub upload_seconds: f64,
    /// The first file (for the floor).
    pub first: PathBuf,
}

/// Makes `count` files of `size` bytes under `dir` (seeded by `seed`) and
/// uploads them to the manager, 8 at a time.
pub async fn prepare(
    dir: &Path,
    size: u64,
    count: usize,
    seed: u64,
    manager: Channel,
) -> anyhow::Result<Prepared> {
    let mut paths = Vec::with_capacity(count);
    for i in 0..count {
        let p = dir.join(format!("input-{seed}-{i}.bin"));
        let q = p.clone();
        tokio::task::spawn_blocking(move || write_file(&q, size, seed * 1_000_003 + i as u64))
            .await??;
        paths.push(p);
    }
    let start = Instant::now();
    let gate = std::sync::Arc::new(tokio::sync::Semaphore::new(8));
    let mut uploads = tokio::task::JoinSet::new();
    for (i, p) in paths.iter().enumerate() {
        let permit = gate.clone().acquire_owned().await?;
        let (ch, p) = (manager.clone(), p.clone());
        uploads.spawn(async move {
            let _permit = permit;
            let f = crate::files::upload_over(ch, None, &p).await?;
            anyhow::Ok((i, f))
        });
    }
    let mut refs = vec![None; count];
    while let Some(r) = uploads.join_next().await {
        let (i, f) = r??;
        refs[i] = Some(f);
    }
    let upload_seconds = start.elapsed().as_secs_f64();
    let inputs = refs
        .into_iter()
        .map(|f| {
            let f = f.context("an upload did not finish")?;
            Ok(BTreeMap::from([("x".to_string(), f.to_text())]))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    // The bench's own copies are not needed once uploaded (except the
    // first, for the floor).
    for p in paths.iter().skip(1) {
        let _ = std::fs::remove_file(p);
    }
    Ok(Prepared {
        inputs,
        upload_seconds,
        first: paths.into_iter().next().unwrap_or_default(),
    })
}

/// Seconds of `cp FILE COPY && sha256sum COPY`, as processes, median of 3
/// (the copy is removed after each).
pub fn cp_sha_seconds(file: &Path) -> anyhow::Result<f64> {
    let copy = file.with_extension("copy");
    let mut times = Vec::new();
    for _ in 0..3 {
        let start = Instant::now();
        let cp = std::process::Command::new("cp")
            .arg(file)
            .arg(&copy)
            .status()
            .context("cannot run cp")?;
        let sha = std::process::Command::new("sha256sum")
            .arg(&copy)
            .stdout(std::process::Stdio::null())
            .status()
            .context("cannot run sha256sum")?;
        times.push(start.elapsed().as_secs_f64());
        let _ = std::fs::remove_file(&copy);
        anyhow::ensure!(cp.success() && sha.success(), "cp or sha256sum failed");
    }
    times.sort_by(f64::total_cmp);
    Ok(times[1])
}
