//! The identification service: an HTTP API and a web page over a [`Catalog`].
//!
//! | method and path | does | token |
//! |---|---|---|
//! | `GET /api/health` | status and catalogue counts | no |
//! | `POST /api/identify` | one photo (multipart `photo`, optional `date`, `place`, `photographer`) → candidates | yes |
//! | `POST /api/jobs` | many photos (repeated `photo`) → a job id; identified in the background | yes |
//! | `GET /api/jobs/{id}` | a job's progress and results | no |
//! | `POST /api/decisions` | confirm / new / merge (JSON) | yes |
//! | `GET /api/individuals[/{id}]` | the individuals; one with its sightings and history | no |
//! | `GET /api/matches?query=NAME&photo=NAME` | the verified local matches of two photos | no |
//! | `GET /images/{name}` | a catalogue photo | no |
//! | `GET /` | the web page | no |
//!
//! Writes need `Authorization: Bearer TOKEN`. Errors are JSON `{"error": "..."}` with a status
//! that says why: 400 bad input (naming the upload), 401 token, 404, 409 already decided, 413
//! too large. Embedding and SQLite work run on blocking threads, off the async workers.

mod conn;
mod jobs;

pub use conn::Timeouts;

use crate::catalog::{Catalog, CatalogError, Decision, Sighting};
use axum::extract::multipart::MultipartRejection;
use axum::extract::multipart::{Field, Multipart, MultipartError};
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;
use std::sync::Arc;

/// Candidates returned for a query, and photos shown for each.
pub const TOP: usize = 5;
pub const PHOTOS_EACH: usize = 3;
/// Most photos in one batch job.
pub const MAX_BATCH: usize = 200;
/// Longest text field of a sighting (date, place, photographer), in bytes.
pub const MAX_TEXT: usize = 1000;

/// What the service runs with.
pub struct AppState {
    pub catalog: Arc<Catalog>,
    /// The token that writes must present.
    pub token: String,
    /// The largest photo accepted, in bytes.
    pub max_upload: usize,
    jobs: jobs::Jobs,
}

impl AppState {
    pub fn new(catalog: Arc<Catalog>, token: String, max_upload: usize) -> Arc<Self> {
        Arc::new(Self {
            catalog,
            token,
            max_upload,
            jobs: jobs::Jobs::default(),
        })
    }
}

/// An answer that is not a success: a status and a message for a person.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(json!({ "error": self.message }))).into_response()
    }
}

impl From<anyhow::Error> for ApiError {
    /// The catalogue's refusals keep their message (it names the input, never a server path);
    /// any other failure is logged on the server and answered without its details.
    fn from(err: anyhow::Error) -> Self {
        let status = match err.downcast_ref::<CatalogError>() {
            Some(CatalogError::NotFound(_)) => StatusCode::NOT_FOUND,
            Some(CatalogError::Conflict(_)) => StatusCode::CONFLICT,
            Some(CatalogError::Invalid(_)) => StatusCode::BAD_REQUEST,
            None => return Self::internal(&err),
        };
        Self::new(status, err.to_string())
    }
}

impl ApiError {
    /// A failure of the server itself: the details go to its log, the answer says only that.
    fn internal(err: &dyn std::fmt::Display) -> Self {
        eprintln!("finprint serve: {err:#}");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the server failed on this request (the details are in its log)",
        )
    }

    /// The same error, its message naming `input` when it does not already.
    fn about(mut self, input: &str) -> Self {
        if !self.message.starts_with(input) {
            self.message = format!("{input}: {}", self.message);
        }
        self
    }
}

/// A path parameter, refused as JSON when it is not UTF-8 text.
fn path_param(param: Result<Path<String>, PathRejection>) -> ApiResult<String> {
    param.map(|Path(p)| p).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("bad path: {}", e.body_text()),
        )
    })
}

/// A multipart form, refused as JSON when the request is not one.
fn multipart(form: Result<Multipart, MultipartRejection>) -> ApiResult<Multipart> {
    form.map_err(|e| {
        ApiError::new(
            e.status(),
            format!("send the photos as multipart/form-data: {}", e.body_text()),
        )
    })
}

type ApiResult<T> = Result<T, ApiError>;

/// Run blocking catalogue work off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> ApiResult<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::internal(&e))?
        .map_err(ApiError::from)
}

/// Writes need the token: checked from the headers, before any of the body is read.
async fn require_token(
    State(state): State<Arc<AppState>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    match authorise(&state, request.headers()) {
        Ok(()) => next.run(request).await,
        Err(e) => e.into_response(),
    }
}

/// Writes need the token as `Authorization: Bearer TOKEN`.
fn authorise(state: &AppState, headers: &HeaderMap) -> ApiResult<()> {
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let Some(given) = given else {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "this request writes to the catalogue: send the service's token as 'Authorization: Bearer TOKEN'",
        ));
    };
    // Compared in time independent of where the first difference is.
    let same = given.len() == state.token.len()
        && given
            .bytes()
            .zip(state.token.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0;
    if same {
        Ok(())
    } else {
        Err(ApiError::new(StatusCode::UNAUTHORIZED, "wrong token"))
    }
}

/// The router of the whole service.
pub fn router(state: Arc<AppState>) -> Router {
    // Room for the multipart framing and the text fields around a photo of the largest size.
    let one = state.max_upload + 64 * 1024;
    let token = axum::middleware::from_fn_with_state(state.clone(), require_token);
    Router::new()
        .route("/", get(page))
        .route("/app.js", get(script))
        .route("/style.css", get(style))
        .route("/images/{name}", get(photo))
        .route("/api/health", get(health))
        .route(
            "/api/identify",
            post(identify)
                .layer(DefaultBodyLimit::max(one))
                .route_layer(token.clone()),
        )
        .route(
            "/api/jobs",
            post(jobs::start)
                .layer(DefaultBodyLimit::max(one * MAX_BATCH))
                .route_layer(token.clone()),
        )
        .route("/api/jobs/{id}", get(jobs::status))
        .route("/api/decisions", post(decide).route_layer(token))
        .route("/api/individuals", get(individuals))
        .route("/api/individuals/{id}", get(individual))
        .route("/api/matches", get(matches))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

/// Serve on `listener` with `timeouts` until `shutdown` completes (see [`conn`]).
pub async fn serve(
    state: Arc<AppState>,
    listener: tokio::net::TcpListener,
    timeouts: Timeouts,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let app = router(state).layer(axum::middleware::from_fn_with_state(
        timeouts.body,
        conn::body_deadline,
    ));
    conn::serve_connections(app, listener, timeouts, shutdown).await;
}

async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!("no such page: {}", uri.path()),
    )
}

async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("{} does not take {method}", uri.path()),
    )
}

async fn page() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        include_str!("web/index.html"),
    )
}

async fn script() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        include_str!("web/app.js"),
    )
}

async fn style() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
        include_str!("web/style.css"),
    )
}

/// A catalogue photo; only plain names of the images folder are served.
async fn photo(
    State(state): State<Arc<AppState>>,
    name: Result<Path<String>, PathRejection>,
) -> ApiResult<Response> {
    let name = path_param(name)?;
    if !crate::catalog::is_safe_name(&name) {
        return Err(ApiError::new(StatusCode::NOT_FOUND, "no such photo"));
    }
    let path = state.catalog.images_dir().join(&name);
    let bytes = tokio::task::spawn_blocking(move || std::fs::read(path))
        .await
        .map_err(|e| ApiError::internal(&e))?
        .map_err(|_| ApiError::new(StatusCode::NOT_FOUND, format!("no photo '{name}'")))?;
    let kind = if bytes.starts_with(&[0xFF, 0xD8]) {
        "image/jpeg"
    } else {
        "image/png"
    };
    Ok((
        [
            (header::CONTENT_TYPE, kind),
            (header::CACHE_CONTROL, "public, max-age=86400"),
        ],
        bytes,
    )
        .into_response())
}

async fn health(State(state): State<Arc<AppState>>) -> ApiResult<Json<serde_json::Value>> {
    let catalog = state.catalog.clone();
    let counts = blocking(move || catalog.counts()).await?;
    Ok(Json(json!({
        "status": "ok",
        "model": state.catalog.embedder().map(|e| e.model_id.clone()),
        "threshold": state.catalog.embedder().map(|e| e.threshold),
        "counts": counts,
        "max_upload_bytes": state.max_upload,
    })))
}

/// One photo of a request, as uploaded.
pub(crate) struct Upload {
    pub name: String,
    pub photo: Held,
}

/// Where an uploaded photo is kept until it is identified: in memory (one photo), or written
/// to a file as it arrives (a batch), so that a batch never holds its photos in memory.
pub(crate) enum Held {
    Memory(Vec<u8>),
    Spooled(Spooled),
}

/// A spooled photo's file, removed with the value.
pub(crate) struct Spooled(std::path::PathBuf);

impl Drop for Spooled {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

impl Upload {
    /// The photo's bytes, read back from its file when spooled.
    pub fn bytes(&self) -> std::io::Result<std::borrow::Cow<'_, [u8]>> {
        match &self.photo {
            Held::Memory(bytes) => Ok(bytes.into()),
            Held::Spooled(file) => std::fs::read(&file.0).map(Into::into),
        }
    }
}

fn multipart_error(e: MultipartError, max_upload: usize) -> ApiError {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "upload too large: a photo may be at most {}",
                megabytes(max_upload)
            ),
        )
    } else {
        ApiError::new(
            e.status(),
            format!("cannot read the upload: {}", e.body_text()),
        )
    }
}

fn megabytes(bytes: usize) -> String {
    if bytes >= 1_000_000 {
        format!("{:.1} MB", bytes as f64 / 1e6)
    } else {
        format!("{:.0} kB", bytes as f64 / 1e3)
    }
}

/// The photos (fields named `photo`) and sighting fields of a multipart form; the photos are
/// spooled to files in `spool` when given, else held in memory.
pub(crate) async fn read_form(
    mut form: Multipart,
    max_upload: usize,
    max_photos: usize,
    spool: Option<&std::path::Path>,
) -> ApiResult<(Vec<Upload>, Sighting)> {
    let mut uploads = Vec::new();
    let mut sighting = Sighting::default();
    while let Some(field) = form
        .next_field()
        .await
        .map_err(|e| multipart_error(e, max_upload))?
    {
        let disposition = field.headers().get(header::CONTENT_DISPOSITION);
        if disposition.is_some_and(|v| v.to_str().is_err()) {
            let name = field.name().unwrap_or("a form field");
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("{name}: its name or file name is not UTF-8 text"),
            ));
        }
        let name = field.name().unwrap_or("").to_string();
        match name.as_str() {
            "photo" => {
                let file = field.file_name().unwrap_or("photo").to_string();
                let photo = read_photo(field, &file, max_upload, spool).await?;
                uploads.push(Upload { name: file, photo });
                if uploads.len() > max_photos {
                    return Err(ApiError::new(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        format!("at most {max_photos} photos at once"),
                    ));
                }
            }
            "date" | "place" | "photographer" => {
                let bytes = field
                    .bytes()
                    .await
                    .map_err(|e| multipart_error(e, max_upload))?;
                if bytes.len() > MAX_TEXT {
                    return Err(ApiError::new(
                        StatusCode::BAD_REQUEST,
                        format!("{name}: at most {MAX_TEXT} bytes"),
                    ));
                }
                let text = String::from_utf8(bytes.to_vec()).map_err(|_| {
                    ApiError::new(StatusCode::BAD_REQUEST, format!("{name}: not UTF-8 text"))
                })?;
                match name.as_str() {
                    "date" => sighting.date = text,
                    "place" => sighting.place = text,
                    _ => sighting.photographer = text,
                }
            }
            _ => {}
        }
    }
    if uploads.is_empty() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "no photo: send the image as the multipart field 'photo'",
        ));
    }
    Ok((uploads, sighting))
}

/// A photo field, refused as soon as it is over `max_upload`; written to a new file of
/// `spool` as it arrives when given (small local writes, done on the async thread).
async fn read_photo(
    mut field: Field<'_>,
    file: &str,
    max_upload: usize,
    spool: Option<&std::path::Path>,
) -> ApiResult<Held> {
    use std::io::Write;
    let mut out = match spool {
        Some(dir) => {
            let path = crate::fsio::temp_path(&dir.join("upload"));
            let created = std::fs::create_dir_all(dir).and_then(|()| std::fs::File::create(&path));
            let file =
                created.map_err(|e| ApiError::internal(&format!("{}: {e}", path.display())))?;
            Some((Spooled(path), std::io::BufWriter::new(file)))
        }
        None => None,
    };
    let mut bytes = Vec::new();
    let mut size = 0;
    while let Some(chunk) = field
        .chunk()
        .await
        .map_err(|e| multipart_error(e, max_upload))?
    {
        size += chunk.len();
        if size > max_upload {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("{file}: over the upload limit of {}", megabytes(max_upload)),
            ));
        }
        match &mut out {
            Some((spooled, writer)) => writer
                .write_all(&chunk)
                .map_err(|e| ApiError::internal(&format!("{}: {e}", spooled.0.display())))?,
            None => bytes.extend_from_slice(&chunk),
        }
    }
    match out {
        Some((spooled, writer)) => {
            writer
                .into_inner()
                .map_err(|e| ApiError::internal(&format!("{}: {e}", spooled.0.display())))?;
            Ok(Held::Spooled(spooled))
        }
        None => Ok(Held::Memory(bytes)),
    }
}

async fn identify(
    State(state): State<Arc<AppState>>,
    form: Result<Multipart, MultipartRejection>,
) -> ApiResult<Response> {
    let (mut uploads, sighting) = read_form(multipart(form)?, state.max_upload, 1, None).await?;
    let upload = uploads.remove(0);
    let name = upload.name.clone();
    let catalog = state.catalog.clone();
    let found = blocking(move || {
        let bytes = upload.bytes()?;
        catalog.identify(&upload.name, &bytes, &sighting, TOP, PHOTOS_EACH)
    })
    .await
    .map_err(|e| e.about(&name))?;
    Ok(Json(found).into_response())
}

/// A decision with who made it.
#[derive(Deserialize)]
struct DecisionRequest {
    #[serde(flatten)]
    decision: Decision,
    #[serde(default)]
    by: String,
    #[serde(default)]
    note: String,
}

async fn decide(
    State(state): State<Arc<AppState>>,
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> ApiResult<Response> {
    let body = body.map_err(|e| {
        ApiError::new(
            e.status(),
            format!("cannot read the decision: {}", e.body_text()),
        )
    })?;
    let req: DecisionRequest = serde_json::from_slice(&body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("not a decision ({e}): send JSON {{\"kind\": \"confirm\"|\"new\"|\"merge\", ..., \"by\": NAME}}"),
        )
    })?;
    let catalog = state.catalog.clone();
    let record = blocking(move || catalog.decide(&req.decision, &req.by, &req.note)).await?;
    Ok((StatusCode::CREATED, Json(record)).into_response())
}

async fn individuals(State(state): State<Arc<AppState>>) -> ApiResult<Response> {
    let catalog = state.catalog.clone();
    let list = blocking(move || catalog.individuals()).await?;
    Ok(Json(list).into_response())
}

async fn individual(
    State(state): State<Arc<AppState>>,
    id: Result<Path<String>, PathRejection>,
) -> ApiResult<Response> {
    let id = path_param(id)?;
    let catalog = state.catalog.clone();
    let detail = blocking(move || catalog.individual(&id)).await?;
    Ok(Json(detail).into_response())
}

/// The two photos of a match view.
#[derive(Deserialize)]
struct MatchesQuery {
    query: String,
    photo: String,
}

/// The verified local matches between a query photo and a candidate's photo, as lines between
/// points in fractions of each photo; by the local settings the service runs with, else the
/// defaults (extracted on demand and kept).
async fn matches(
    State(state): State<Arc<AppState>>,
    query: Result<Query<MatchesQuery>, QueryRejection>,
) -> ApiResult<Response> {
    let Query(q) = query.map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!(
                "send the two photos as ?query=NAME&photo=NAME: {}",
                e.body_text()
            ),
        )
    })?;
    let catalog = state.catalog.clone();
    let found = blocking(move || catalog.matches(&q.query, &q.photo)).await?;
    Ok(Json(found).into_response())
}

/// `finprint serve`.
#[derive(Clone, Debug, clap::Args)]
pub struct ServeArgs {
    /// The catalogue folder (created when missing).
    #[arg(long)]
    pub catalog: std::path::PathBuf,
    #[command(flatten)]
    pub model: crate::runs::ModelArgs,
    /// The new_individual threshold [default: the one the models saved; 0 for --zero-shot].
    #[arg(long)]
    pub threshold: Option<f32>,
    /// A Kaggle folder (train.csv, train_images/) or a finprint export imported into an empty
    /// catalogue; ignored once the catalogue holds photos.
    #[arg(long)]
    pub import: Option<std::path::PathBuf>,
    /// The address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub addr: String,
    /// The token that writes need [default: $FINPRINT_TOKEN, else a random one, printed].
    #[arg(long)]
    pub token: Option<String>,
    /// Largest photo accepted, in megabytes.
    #[arg(long, default_value_t = 20.0)]
    pub max_upload_mb: f64,
    #[command(flatten)]
    pub local: crate::local::LocalArgs,
    /// With --local: rank by the fused probability of a saved calibration (JSON, fitted for this
    /// model and these local settings), its threshold deciding new_individual [default: none:
    /// verified local votes rank, the model's threshold decides].
    #[arg(long)]
    pub calibration: Option<std::path::PathBuf>,
    /// The catalogue's search index: flat (exact), flat-f16 or hnsw[:M[,EF]].
    #[arg(long, default_value_t = crate::search::IndexSpec::default())]
    pub index: crate::search::IndexSpec,
    /// libtorch threads [default: the free cores].
    #[arg(long)]
    pub threads: Option<usize>,
    /// Seconds a client may take to send a request's headers.
    #[arg(long, default_value_t = 10.0)]
    pub header_timeout_s: f64,
    /// Seconds a client may take to send a request's body once its headers are in (else 408).
    #[arg(long, default_value_t = 300.0)]
    pub body_timeout_s: f64,
    /// Seconds a connection may stay silent while the service waits on the client (a
    /// half-sent request, or an idle kept-alive connection) before it is closed.
    #[arg(long, default_value_t = 60.0)]
    pub idle_timeout_s: f64,
}

impl ServeArgs {
    /// The timeouts the flags give.
    pub fn timeouts(&self) -> anyhow::Result<Timeouts> {
        let secs = |v: f64, flag: &str| {
            anyhow::ensure!(
                v.is_finite() && v > 0.0,
                "--{flag} must be a positive number of seconds"
            );
            Ok(std::time::Duration::from_secs_f64(v))
        };
        Ok(Timeouts {
            header: secs(self.header_timeout_s, "header-timeout-s")?,
            body: secs(self.body_timeout_s, "body-timeout-s")?,
            idle: secs(self.idle_timeout_s, "idle-timeout-s")?,
        })
    }
}

/// Open the catalogue as `args` says and serve it until Ctrl-C; `say` prints each line a
/// person should see (what was opened, then the address with the token).
pub fn run(args: &ServeArgs, say: &mut dyn FnMut(String)) -> anyhow::Result<()> {
    use anyhow::Context;
    crate::runtime::configure_threads(args.threads);
    anyhow::ensure!(args.max_upload_mb > 0.0, "--max-upload-mb must be positive");
    let timeouts = args.timeouts()?;
    let progress = crate::args::bar(0, "opening the catalogue");
    let (catalog, said) = open_catalog(args, &progress)?;
    progress.finish_and_clear();
    let counts = catalog.counts()?;
    say(format!(
        "catalogue {}: {} individuals, {} photos ({said})",
        args.catalog.display(),
        counts.individuals,
        counts.photos
    ));
    let token = args
        .token
        .clone()
        .or_else(|| std::env::var("FINPRINT_TOKEN").ok())
        .filter(|t| !t.trim().is_empty())
        .unwrap_or_else(random_token);
    let max_upload = (args.max_upload_mb * 1e6) as usize;
    let state = AppState::new(Arc::new(catalog), token.clone(), max_upload);
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?
        .block_on(async {
            let listener = tokio::net::TcpListener::bind(&args.addr)
                .await
                .with_context(|| format!("cannot listen on {}", args.addr))?;
            let addr = listener.local_addr()?;
            say(format!(
                "finprint serving on http://{addr}/#token={token}  (Ctrl-C stops)"
            ));
            serve(state, listener, timeouts, async {
                let _ = tokio::signal::ctrl_c().await;
            })
            .await;
            Ok(())
        })
}

/// Open the catalogue, import into it when it is empty, attach the models (embedding the
/// photos that lack their embedding) and, with `--local`, local matching (extracting the
/// features photos lack). Returns the catalogue and a line saying what was done.
pub fn open_catalog(
    opts: &ServeArgs,
    progress: &indicatif::ProgressBar,
) -> anyhow::Result<(Catalog, String)> {
    // Checked before anything is imported or embedded, so that a wrong calibration fails at once.
    let local = local_search(opts)?;
    let mut catalog = Catalog::open(&opts.catalog)?;
    let mut said = Vec::new();
    if let Some(dir) = &opts.import {
        let held = catalog.counts()?;
        if held.photos == 0 {
            progress.set_message("importing");
            let s = catalog.import(dir, &format!("import of {}", dir.display()), progress)?;
            said.push(format!(
                "imported {} individuals and {} photos from {}",
                s.individuals,
                s.photos,
                dir.display()
            ));
        } else {
            said.push(format!(
                "--import skipped: the catalogue already holds {} photos",
                held.photos
            ));
        }
    }
    progress.set_message("loading the model");
    let embedder = crate::catalog::Embedder::start(&opts.model.spec(), opts.threshold)?;
    progress.set_message("embedding new photos");
    progress.reset();
    let attached = catalog.attach(embedder, opts.index, progress)?;
    said.push(format!("embedded {} photos", attached.embedded));
    if !attached.unusable.is_empty() {
        said.push(format!(
            "skipped {} unusable photos, left without an embedding: {}",
            attached.unusable.len(),
            attached.unusable.join(", ")
        ));
    }
    if let Some(local) = local {
        progress.set_message("extracting local features");
        progress.reset();
        let fused = local.calibration.is_some();
        let extracted = catalog.attach_local(local, progress)?;
        said.push(format!(
            "extracted the local features of {} photos ({})",
            extracted.extracted,
            if fused {
                "ranked by the calibrated fusion"
            } else {
                "ranked by verified local votes"
            }
        ));
        if extracted.whitened_on > 0 {
            said.push(format!(
                "local descriptors whitened (--local-whitening {}) by a whitening fitted on {} catalogue photos",
                opts.local.local_whitening, extracted.whitened_on
            ));
        }
        if !extracted.unusable.is_empty() {
            said.push(format!(
                "skipped {} unusable photos, left without local features: {}",
                extracted.unusable.len(),
                extracted.unusable.join(", ")
            ));
        }
    }
    Ok((catalog, said.join("; ")))
}

/// The local matching `opts` ask for, its calibration checked against their model.
fn local_search(opts: &ServeArgs) -> anyhow::Result<Option<crate::catalog::LocalSearch>> {
    if !opts.local.enabled() {
        anyhow::ensure!(
            opts.calibration.is_none(),
            "--calibration needs --local rootsift"
        );
        return Ok(None);
    }
    let calibration = match &opts.calibration {
        Some(path) => {
            let c = crate::local::calibration::Calibration::load(path)?;
            let model = opts.model.spec().identity()?;
            c.check(path, &model, &opts.local)?;
            Some(c)
        }
        None => None,
    };
    crate::catalog::LocalSearch::new(&opts.local, calibration).map(Some)
}

/// A random token for a service started without one.
pub fn random_token() -> String {
    use rand::Rng;
    format!("{:032x}", rand::thread_rng().gen::<u128>())
}
