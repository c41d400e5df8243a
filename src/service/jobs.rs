//! Batch identification: many photos in one request, identified one after another in the
//! background; the job's id answers with its progress and the results so far. The photos are
//! written to the catalogue's spool folder as they arrive, never all held in memory.

use super::{
    multipart, path_param, read_form, ApiError, ApiResult, AppState, MAX_BATCH, PHOTOS_EACH, TOP,
};
use crate::catalog::Identification;
use axum::extract::multipart::MultipartRejection;
use axum::extract::rejection::PathRejection;
use axum::extract::{Multipart, Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use serde_json::json;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// The result for one photo of a job: its identification, or why it could not be identified.
#[derive(Clone, Debug, Serialize)]
pub struct JobItem {
    pub upload: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result: Option<Identification>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct JobStatus {
    pub job: String,
    pub total: usize,
    pub done: usize,
    pub finished: bool,
    pub results: Vec<JobItem>,
}

/// The jobs of this run of the service, in memory (their photos are pending photos of the
/// catalogue, so nothing is lost with them); finished jobs beyond the last [`KEEP`] are dropped.
#[derive(Default)]
pub struct Jobs {
    next: AtomicU64,
    all: Mutex<HashMap<u64, Arc<Mutex<JobStatus>>>>,
}

/// Jobs whose results stay available.
const KEEP: u64 = 100;

pub async fn start(
    State(state): State<Arc<AppState>>,
    form: Result<Multipart, MultipartRejection>,
) -> ApiResult<Response> {
    let spool = state.catalog.spool_dir();
    let form = multipart(form)?;
    let (uploads, sighting) = read_form(form, state.max_upload, MAX_BATCH, Some(&spool)).await?;
    let number = state.jobs.next.fetch_add(1, Ordering::Relaxed) + 1;
    let id = format!("job-{number}");
    let status = Arc::new(Mutex::new(JobStatus {
        job: id.clone(),
        total: uploads.len(),
        done: 0,
        finished: false,
        results: Vec::new(),
    }));
    {
        let mut all = state.jobs.all.lock().unwrap_or_else(|e| e.into_inner());
        all.retain(|&n, job| {
            n + KEEP > number || !job.lock().unwrap_or_else(|e| e.into_inner()).finished
        });
        all.insert(number, status.clone());
    }
    let catalog = state.catalog.clone();
    let total = uploads.len();
    tokio::task::spawn_blocking(move || {
        // One photo in memory at a time; each spooled file goes when its photo is done.
        for upload in uploads {
            let found = upload
                .bytes()
                .map_err(anyhow::Error::from)
                .and_then(|bytes| {
                    catalog.identify(&upload.name, &bytes, &sighting, TOP, PHOTOS_EACH)
                });
            let item = match found {
                Ok(found) => JobItem {
                    upload: upload.name.clone(),
                    result: Some(found),
                    error: None,
                },
                Err(e) => JobItem {
                    upload: upload.name.clone(),
                    result: None,
                    error: Some(ApiError::from(e).about(&upload.name).message),
                },
            };
            drop(upload);
            let mut s = status.lock().unwrap_or_else(|e| e.into_inner());
            s.results.push(item);
            s.done += 1;
        }
        status.lock().unwrap_or_else(|e| e.into_inner()).finished = true;
    });
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({ "job": id, "total": total, "status": format!("/api/jobs/{id}") })),
    )
        .into_response())
}

pub async fn status(
    State(state): State<Arc<AppState>>,
    id: Result<Path<String>, PathRejection>,
) -> ApiResult<Json<JobStatus>> {
    let id = path_param(id)?;
    let job = id
        .strip_prefix("job-")
        .and_then(|n| n.parse::<u64>().ok())
        .and_then(|n| {
            let all = state.jobs.all.lock().unwrap_or_else(|e| e.into_inner());
            all.get(&n).cloned()
        })
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("no job '{id}'")))?;
    let snapshot = job.lock().unwrap_or_else(|e| e.into_inner()).clone();
    Ok(Json(snapshot))
}
