//! Files from the command line: `NAME=@path` uploads a file (or
//! `@a,@b` a `File[]`) before a workflow runs, `caroni workflow download`
//! writes a workflow's File outputs. Both stream in 1 MiB chunks (neither
//! holds a file in memory), show a progress bar on a terminal, resume
//! where an earlier attempt stopped and check the SHA-256.

use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use caroni_proto::v1 as pb;
use caroni_types::file::{files_of, hex, list_text, FileRef, Files};
use sha2::{Digest, Sha256};
use tokio_stream::StreamExt;

use crate::client::{status, Context};

/// Chunk size of uploads.
const CHUNK: usize = 1 << 20;

fn bar(len: u64, what: &str) -> indicatif::ProgressBar {
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let b = indicatif::ProgressBar::new(len);
    b.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    b.set_message(what.to_string());
    b
}

/// Hashes a file (on the blocking pool).
async fn hash_file(path: PathBuf) -> anyhow::Result<(String, u64)> {
    tokio::task::spawn_blocking(move || -> anyhow::Result<(String, u64)> {
        let mut f = std::fs::File::open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        let mut h = Sha256::new();
        let mut buf = vec![0; CHUNK];
        let mut n = 0u64;
        loop {
            let k = f
                .read(&mut buf)
                .with_context(|| format!("cannot read {}", path.display()))?;
            if k == 0 {
                break;
            }
            h.update(&buf[..k]);
            n += k as u64;
        }
        Ok((hex(&h.finalize()), n))
    })
    .await?
}

/// Uploads the file at `path` to the node (resuming what it holds of it)
/// and returns its reference.
pub async fn upload(ctx: &Context, path: &Path) -> anyhow::Result<FileRef> {
    upload_over(ctx.channel().await?, ctx.token(), path).await
}

/// [`upload`] over a channel, with an API token if the node needs one.
pub async fn upload_over(
    channel: tonic::transport::Channel,
    token: Option<&str>,
    path: &Path,
) -> anyhow::Result<FileRef> {
    let meta = std::fs::metadata(path).with_context(|| {
        format!(
            "cannot read {}; give the path of a file after @",
            path.display()
        )
    })?;
    if !meta.is_file() {
        bail!("{} is not a regular file", path.display());
    }
    let basename = path
        .file_name()
        .and_then(|n| n.to_str())
        .with_context(|| format!("{} has no usable file name", path.display()))?
        .to_string();
    let (sha256, size) = hash_file(path.to_path_buf()).await?;
    let file = FileRef::new(sha256.clone(), size, basename)
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let mut client = pb::file_service_client::FileServiceClient::new(channel);
    // Another upload of the same content may be under way (two runs of
    // one workflow): the node then holds more than this upload was told,
    // refuses it, and this one starts again from where the node is.
    let mut attempt = 0;
    let resp = loop {
        let st = client
            .upload_status(crate::client::with_token(
                pb::UploadStatusRequest {
                    sha256: sha256.clone(),
                },
                token,
            ))
            .await
            .map_err(status)?
            .into_inner();
        if st.complete {
            return Ok(file);
        }
        let offset = st.committed.min(size);
        let progress = bar(size, &file.basename);
        progress.set_position(offset);
        let (tx, rx) = tokio::sync::mpsc::channel::<pb::UploadChunk>(4);
        let reader = {
            let path = path.to_path_buf();
            let first = pb::FileRef {
                sha256: sha256.clone(),
                size,
                basename: file.basename.clone(),
            };
            let progress = progress.clone();
            tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
                use std::io::Seek;
                let mut f = std::fs::File::open(&path)?;
                f.seek(std::io::SeekFrom::Start(offset))?;
                let mut first = Some(first);
                loop {
                    let mut buf = vec![0; CHUNK];
                    let k = f.read(&mut buf)?;
                    buf.truncate(k);
                    if k == 0 && first.is_none() {
                        break;
                    }
                    let msg = pb::UploadChunk {
                        file: first.take(),
                        offset,
                        data: buf,
                    };
                    if tx.blocking_send(msg).is_err() {
                        break;
                    }
                    progress.inc(k as u64);
                    if k == 0 {
                        break;
                    }
                }
                Ok(())
            })
        };
        let resp = client
            .upload(crate::client::with_token(
                tokio_stream::wrappers::ReceiverStream::new(rx),
                token,
            ))
            .await;
        let _ = reader.await;
        progress.finish_and_clear();
        match resp {
            Err(s) if s.code() == tonic::Code::FailedPrecondition && attempt < 10 => {
                attempt += 1;
                tokio::time::sleep(std::time::Duration::from_millis(50 * attempt)).await;
            }
            other => break other,
        }
    };
    let got = resp.map_err(status)?.into_inner();
    if got.sha256 != sha256 {
        bail!(
            "the node stored {} under another hash; the upload is refused",
            path.display()
        );
    }
    Ok(file)
}

/// Turns `NAME=@path` (and `NAME=@a,@b`) arguments into uploaded File
/// references; other values are left as they are. `@@text` passes `@text`.
pub async fn upload_inputs(
    ctx: &Context,
    inputs: &mut std::collections::BTreeMap<String, String>,
) -> anyhow::Result<()> {
    for (name, v) in inputs.iter_mut() {
        if let Some(rest) = v.strip_prefix("@@") {
            *v = format!("@{rest}");
            continue;
        }
        if !v.starts_with('@') {
            continue;
        }
        let paths: Vec<&str> = v.split(',').map(str::trim).collect();
        if paths.iter().any(|p| !p.starts_with('@')) {
            bail!("input {name}: write a list of files as @a,@b (each with @)");
        }
        let mut refs = Vec::new();
        for p in paths {
            let path = Path::new(&p[1..]);
            let f = upload(ctx, path)
                .await
                .with_context(|| format!("input {name}: cannot upload {}", path.display()))?;
            tell!("uploaded {} as {}", path.display(), f.describe());
            refs.push(f);
        }
        *v = if refs.len() == 1 && !v.contains(',') {
            refs.remove(0).to_text()
        } else {
            list_text(&refs)
        };
    }
    Ok(())
}

/// Downloads `file` to `to` (resuming a partial `to.part`), checking its
/// hash; the file appears at `to` only whole.
pub async fn download(ctx: &Context, file: &FileRef, to: &Path) -> anyhow::Result<()> {
    let part = to.with_extension(match to.extension().and_then(|e| e.to_str()) {
        Some(e) => format!("{e}.part"),
        None => "part".into(),
    });
    let mut out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .read(true)
        .open(&part)
        .with_context(|| format!("cannot write {}", part.display()))?;
    let mut have = out.metadata()?.len();
    if have > file.size {
        out.set_len(0)?;
        have = 0;
    }
    // What is there already counts toward the hash.
    let mut h = Sha256::new();
    {
        let mut f = std::fs::File::open(&part)?;
        let mut buf = vec![0; CHUNK];
        loop {
            let k = f.read(&mut buf)?;
            if k == 0 {
                break;
            }
            h.update(&buf[..k]);
        }
    }
    let progress = bar(file.size, &file.basename);
    progress.set_position(have);
    let mut client = pb::file_service_client::FileServiceClient::new(ctx.channel().await?)
        .max_decoding_message_size(CHUNK + 64 * 1024);
    let mut stream = client
        .download(ctx.request(pb::DownloadRequest {
            sha256: file.sha256.clone(),
            offset: have,
        }))
        .await
        .map_err(status)?
        .into_inner();
    while let Some(c) = stream.next().await {
        let c = c.map_err(status)?;
        if c.offset != have {
            bail!(
                "the node sent bytes from {} where {have} was expected",
                c.offset
            );
        }
        out.write_all(&c.data)?;
        h.update(&c.data);
        have += c.data.len() as u64;
        progress.set_position(have);
        if have > file.size {
            bail!("the node sent more than the file's {} bytes", file.size);
        }
    }
    progress.finish_and_clear();
    out.sync_all()?;
    if have != file.size {
        bail!(
            "the download stopped at byte {have} of {}; run the command again to resume",
            file.size
        );
    }
    if hex(&h.finalize()) != file.sha256 {
        let _ = std::fs::remove_file(&part);
        bail!(
            "{} does not hash to {}; it was deleted, download it again",
            file.basename,
            file.sha256
        );
    }
    std::fs::rename(&part, to)
        .with_context(|| format!("cannot move the file to {}", to.display()))?;
    Ok(())
}

/// Every File output of a workflow: (output, its files).
pub fn file_outputs(w: &pb::Workflow) -> Vec<(String, Vec<FileRef>)> {
    let mut out: Vec<(String, Vec<FileRef>)> = w
        .outputs
        .iter()
        .filter_map(|(k, v)| match files_of(v) {
            Files::None => None,
            f => Some((k.clone(), f.into_refs())),
        })
        .collect();
    out.sort();
    out
}

/// A value for people: a File as its name, size and hash; text as it is.
pub fn show_value(v: &str) -> String {
    match files_of(v) {
        Files::None => v.to_string(),
        f => f
            .refs()
            .iter()
            .map(|r| r.describe())
            .collect::<Vec<_>>()
            .join(", "),
    }
}
