//! Files in the console: uploads from the start form and downloads of File
//! values.
//!
//! - `POST /api/files?name=NAME` (a session, like every `/api` call): the
//!   body is the file, streamed to the blob store's `tmp/` while it
//!   arrives, then stored by its SHA-256; answers the reference.
//! - `POST /api/files/{sha256}/link` (a session): a link to download the
//!   file, signed (HMAC-SHA-256 with a key of this process) and valid for
//!   10 minutes, so that the browser can save it to disk itself: a plain
//!   link carries no session header, and a file is never held in the
//!   page's memory.
//! - `GET /files/{sha256}?name=…&exp=…&sig=…`: the file, streamed, when
//!   the signature and the time hold.

use axum::body::Body;
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use hmac::{KeyInit, Mac};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;
use tokio_stream::StreamExt;

use super::{Console, Failure};

/// How long a download link works.
const LINK_MS: u64 = 10 * 60 * 1000;

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

fn signature(key: &[u8], sha: &str, name: &str, exp: u64) -> String {
    // HMAC takes keys of any length; an empty signature matches nothing.
    let Ok(mut mac) = HmacSha256::new_from_slice(key) else {
        return String::new();
    };
    mac.update(format!("{sha}\n{name}\n{exp}").as_bytes());
    caroni_types::file::hex(&mac.finalize().into_bytes())
}

#[derive(Deserialize)]
pub(super) struct UploadQuery {
    name: String,
}

/// `POST /api/files?name=NAME`, the file as the body.
pub(super) async fn upload(
    State(c): State<Console>,
    Query(q): Query<UploadQuery>,
    request: Request,
) -> Result<Json<Value>, Failure> {
    caroni_types::file::check_basename(&q.name)
        .map_err(|e| Failure(StatusCode::BAD_REQUEST, format!("file name: {e}")))?;
    let blobs = c.0.src.blobs.clone();
    let tmp = blobs.scratch_path();
    let mut out = tokio::fs::File::create(&tmp).await.map_err(|e| {
        Failure(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("cannot store the upload: {e}"),
        )
    })?;
    let mut body = request.into_body().into_data_stream();
    let mut size = 0u64;
    while let Some(chunk) = body.next().await {
        let chunk = match chunk {
            Ok(c) => c,
            Err(e) => {
                let _ = tokio::fs::remove_file(&tmp).await;
                return Err(Failure(
                    StatusCode::BAD_REQUEST,
                    format!("the upload broke off after {size} bytes: {e}"),
                ));
            }
        };
        size += chunk.len() as u64;
        if let Err(e) = out.write_all(&chunk).await {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(Failure(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("cannot store the upload: {e}"),
            ));
        }
    }
    drop(out);
    let name = q.name.clone();
    let t = tmp.clone();
    let stored = blobs
        .blocking(move |b| b.ingest(&t, &name, true))
        .await
        .map_err(|e| {
            let status = match e {
                caroni_blob::BlobError::Budget { .. } => StatusCode::INSUFFICIENT_STORAGE,
                _ => StatusCode::SERVICE_UNAVAILABLE,
            };
            Failure(status, e.to_string())
        });
    let _ = tokio::fs::remove_file(&tmp).await;
    let f = stored?;
    Ok(Json(json!({
        "sha256": f.sha256,
        "size": f.size,
        "basename": f.basename,
        "value": f.to_text(),
    })))
}

#[derive(Deserialize)]
pub(super) struct LinkQuery {
    name: Option<String>,
}

/// `POST /api/files/{sha256}/link?name=NAME` → `{"url": …}`.
pub(super) async fn link(
    State(c): State<Console>,
    Path(sha): Path<String>,
    Query(q): Query<LinkQuery>,
) -> Result<Json<Value>, Failure> {
    if c.0.src.blobs.has(&sha).is_none() {
        return Err(Failure(
            StatusCode::NOT_FOUND,
            format!(
                "no file {} on this node",
                sha.chars().take(64).collect::<String>()
            ),
        ));
    }
    let name = q
        .name
        .filter(|n| caroni_types::file::check_basename(n).is_ok())
        .unwrap_or_else(|| sha.clone());
    let exp = caroni_types::now_ms() + LINK_MS;
    let sig = signature(&c.0.link_key, &sha, &name, exp);
    let url = format!("/files/{sha}?name={}&exp={exp}&sig={sig}", percent(&name));
    Ok(Json(json!({ "url": url })))
}

/// Percent-encodes a name for a query string.
fn percent(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[derive(Deserialize)]
pub(super) struct FileQuery {
    name: String,
    exp: u64,
    sig: String,
}

/// True when a download link is this process's and still valid.
pub(super) fn link_holds(c: &Console, sha: &str, q_name: &str, exp: u64, sig: &str) -> bool {
    use subtle::ConstantTimeEq;
    exp > caroni_types::now_ms()
        && bool::from(
            signature(&c.0.link_key, sha, q_name, exp)
                .as_bytes()
                .ct_eq(sig.as_bytes()),
        )
}

/// `GET /files/{sha256}?name=…&exp=…&sig=…`: the file.
pub(super) async fn download(
    State(c): State<Console>,
    Path(sha): Path<String>,
    Query(q): Query<FileQuery>,
) -> Response {
    if !link_holds(&c, &sha, &q.name, q.exp, &q.sig) {
        return Failure(
            StatusCode::FORBIDDEN,
            "this download link is not valid (any more); open the file from the console again"
                .into(),
        )
        .into_response();
    }
    let size = c.0.src.blobs.has(&sha);
    let chunks = match caroni_peer::blobs::serve(&c.0.src.blobs, &sha, 0) {
        Ok(s) => s,
        Err(s) => return Failure::from(s).into_response(),
    };
    let body = Body::from_stream(chunks.map(|c| {
        c.map(|c| axum::body::Bytes::from(c.data))
            .map_err(|s| std::io::Error::other(s.message().to_string()))
    }));
    let name = q.name.replace(['"', '\\', '\r', '\n'], "_");
    let mut resp = (
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{name}\""),
            ),
        ],
        body,
    )
        .into_response();
    if let Some(n) = size {
        if let Ok(v) = n.to_string().parse() {
            resp.headers_mut().insert(header::CONTENT_LENGTH, v);
        }
    }
    resp
}
