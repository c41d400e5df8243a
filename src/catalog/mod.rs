//! The catalogue of known animals: individuals, their photos (each a sighting, with its date,
//! place and photographer where given), the photos' embeddings, and every decision with who
//! made it and when.
//!
//! A catalogue is a folder: `catalog.sqlite` (SQLite in WAL mode, synchronous FULL: a decision
//! that was answered is on disk) and `images/` (photo files, each written atomically before
//! the row that names it), and `incoming/` where the service spools the photos of a batch
//! while they wait to be identified. Embeddings are kept as f32 blobs tagged with the model's identity;
//! photos without an embedding of the current model are embedded when a model is attached, and
//! the in-memory search index is rebuilt then and updated on every enrolment. Local features
//! (see [`Catalog::attach_local`]) are kept the same way, tagged with their extraction settings.
//!
//! Merging keeps history: the merged individual stays, marked `merged_into` the other, and its
//! photos keep the id they were confirmed as; searches and pages resolve it to the survivor.

mod embedder;
mod exchange;
mod gallery;
mod local;

pub use embedder::Embedder;
pub use exchange::{export, import, ExportArgs, ImportArgs, ImportSummary};
pub use gallery::to_blob;
pub use local::{Extracted, LocalMatch, LocalSearch, Matches};

use crate::data::image::decode_rgb;
use crate::data::NEW_INDIVIDUAL;
use crate::decide::{answers, Candidate};
use crate::fsio::{self, fnv1a};
use crate::search::IndexSpec;
use anyhow::{Context, Result};
use gallery::Gallery;
use indicatif::ProgressBar;
use rand::Rng;
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, RwLock};

/// Why a request on the catalogue was refused; the service answers each with its own status.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Invalid(String),
}

fn not_found(msg: impl Into<String>) -> anyhow::Error {
    CatalogError::NotFound(msg.into()).into()
}
fn conflict(msg: impl Into<String>) -> anyhow::Error {
    CatalogError::Conflict(msg.into()).into()
}
fn invalid(msg: impl Into<String>) -> anyhow::Error {
    CatalogError::Invalid(msg.into()).into()
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS individuals (
    id TEXT PRIMARY KEY,
    species TEXT NOT NULL DEFAULT '',
    merged_into TEXT REFERENCES individuals(id),
    created_at TEXT NOT NULL,
    created_by TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS photos (
    image TEXT PRIMARY KEY,
    individual_id TEXT REFERENCES individuals(id),
    species TEXT NOT NULL DEFAULT '',
    date TEXT NOT NULL DEFAULT '',
    place TEXT NOT NULL DEFAULT '',
    photographer TEXT NOT NULL DEFAULT '',
    added_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS photos_individual ON photos(individual_id);
CREATE TABLE IF NOT EXISTS embeddings (
    image TEXT PRIMARY KEY REFERENCES photos(image),
    model TEXT NOT NULL,
    vector BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS local_features (
    image TEXT PRIMARY KEY REFERENCES photos(image),
    extraction TEXT NOT NULL,
    features BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS decisions (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL CHECK (kind IN ('import', 'confirm', 'new', 'merge')),
    image TEXT NOT NULL DEFAULT '',
    individual_id TEXT NOT NULL DEFAULT '',
    other_id TEXT NOT NULL DEFAULT '',
    decided_by TEXT NOT NULL,
    decided_at TEXT NOT NULL,
    note TEXT NOT NULL DEFAULT ''
);
";

/// SQLite's clock, as stored in every `*_at` column: UTC, ISO 8601 with milliseconds.
const NOW: &str = "strftime('%Y-%m-%dT%H:%M:%fZ', 'now')";

/// Whether `name` may name an image file or an individual: letters, digits, `.`, `_`, `-`,
/// not starting with a dot, at most 128 characters. Such a name never leaves its folder.
pub fn is_safe_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Where and when a photo was taken, and by whom; empty where not given.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sighting {
    #[serde(default)]
    pub date: String,
    #[serde(default)]
    pub place: String,
    #[serde(default)]
    pub photographer: String,
}

impl Sighting {
    fn trimmed(&self) -> Sighting {
        Sighting {
            date: self.date.trim().to_string(),
            place: self.place.trim().to_string(),
            photographer: self.photographer.trim().to_string(),
        }
    }
}

/// A photo of the catalogue.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Photo {
    pub image: String,
    /// The id it was confirmed as (possibly since merged into another); `None` while pending.
    pub individual_id: Option<String>,
    pub species: String,
    #[serde(flatten)]
    pub sighting: Sighting,
    pub added_at: String,
}

/// A recorded decision.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DecisionRecord {
    pub seq: i64,
    pub kind: String,
    pub image: String,
    pub individual_id: String,
    pub other_id: String,
    pub decided_by: String,
    pub decided_at: String,
    pub note: String,
}

/// What a person decided about a photo or two individuals.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Decision {
    /// The pending photo `image` shows the known individual `individual_id`.
    Confirm {
        image: String,
        individual_id: String,
    },
    /// The pending photo `image` shows an animal not yet catalogued: a new individual, with the
    /// given id or a generated one.
    New {
        image: String,
        #[serde(default)]
        individual_id: Option<String>,
        #[serde(default)]
        species: Option<String>,
    },
    /// `from` and `into` are the same animal: `from` is merged into `into`.
    Merge { from: String, into: String },
}

/// An individual with its photos counted, as listed.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct IndividualSummary {
    pub id: String,
    pub species: String,
    pub photos: usize,
    /// Ids merged into this one.
    pub aliases: Vec<String>,
    /// Its first photo.
    pub cover: Option<String>,
    pub created_at: String,
    pub created_by: String,
}

/// An individual's page: its sightings and the decisions about it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct IndividualDetail {
    #[serde(flatten)]
    pub summary: IndividualSummary,
    /// The id asked for, when it was merged into this one.
    pub requested: Option<String>,
    pub sightings: Vec<Photo>,
    pub history: Vec<DecisionRecord>,
}

/// One of the best photos of a candidate, with its similarity to the query.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PhotoMatch {
    pub image: String,
    pub score: f32,
}

/// A candidate individual for a query photo.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CandidateView {
    pub individual_id: String,
    pub species: String,
    /// What the threshold is compared with: the cosine of its photo most like the query, or
    /// with local features and a calibration the fused probability of its best photo.
    pub score: f32,
    /// Its photos most like the query, best first (with local features, the one that matched
    /// best first).
    pub photos: Vec<PhotoMatch>,
    /// With local features: how its best photo matched the query (none for an individual found
    /// only beyond the shortlist).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub local: Option<LocalMatch>,
}

/// The answer to an identification.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Identification {
    /// The name under which the query photo is kept (pending until a decision).
    pub image: String,
    /// The file name it was uploaded as.
    pub upload: String,
    /// The individual it was already confirmed as, when this photo was decided before.
    pub individual_id: Option<String>,
    pub candidates: Vec<CandidateView>,
    /// The five answers with `new_individual` placed by the threshold (Kaggle's form).
    pub answers: Vec<String>,
    /// Whether even the best candidate is below the threshold.
    pub new_individual: bool,
    pub threshold: f32,
    /// What ranks the candidates: `embedding` (cosine), `local` (verified local votes over the
    /// embedding's shortlist) or `fused` (calibrated probability of both).
    pub ranked_by: String,
}

/// Numbers that must add up whatever happened.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Counts {
    pub individuals: usize,
    pub merged: usize,
    pub photos: usize,
    pub pending: usize,
    pub decisions: usize,
    pub indexed: usize,
}

/// An open catalogue.
pub struct Catalog {
    dir: PathBuf,
    conn: Mutex<Connection>,
    gallery: RwLock<Option<Gallery>>,
    embedder: Option<Embedder>,
    local: Option<LocalSearch>,
}

/// The spool folder's name in a catalogue (see [`Catalog::spool_dir`]).
const SPOOL: &str = "incoming";

/// Most photos per batch embedded when a model is attached.
const SYNC_BATCH: usize = 16;
/// Most pixels decoded and held at once for a batch embedded when a model is attached (192 MB
/// as RGB); a batch is sent as soon as it holds this many, so memory at start stays bounded
/// whatever is pending.
const SYNC_PIXELS: u64 = 64_000_000;

/// What attaching a model did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Attached {
    /// Photos embedded.
    pub embedded: usize,
    /// Photos that could not be decoded, as `NAME: why`; they stay without an embedding (and
    /// pending if they were) and are tried again on the next start.
    pub unusable: Vec<String>,
}

impl Catalog {
    /// Open (or create) the catalogue in `dir`, removing the temporary files of writes that a
    /// killed process left in it.
    pub fn open(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir.join("images"))
            .with_context(|| format!("cannot create catalogue folder {}", dir.display()))?;
        for folder in [dir.join("images"), dir.join(SPOOL), dir.to_path_buf()] {
            fsio::remove_orphan_temps(&folder)?;
        }
        let path = dir.join("catalog.sqlite");
        let conn = Connection::open(&path)
            .with_context(|| format!("cannot open catalogue {}", path.display()))?;
        conn.busy_timeout(std::time::Duration::from_secs(30))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.execute_batch(SCHEMA)
            .with_context(|| format!("{}: not a finprint catalogue", path.display()))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            conn: Mutex::new(conn),
            gallery: RwLock::new(None),
            embedder: None,
            local: None,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn images_dir(&self) -> PathBuf {
        self.dir.join("images")
    }

    /// Where the service writes the photos of a batch while it is identified.
    pub fn spool_dir(&self) -> PathBuf {
        self.dir.join(SPOOL)
    }

    pub fn embedder(&self) -> Option<&Embedder> {
        self.embedder.as_ref()
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Search with `embedder`: photos without its embedding are embedded (progress on
    /// `progress`), one bounded batch at a time (see [`SYNC_PIXELS`]), and an index of kind
    /// `index` is built. A photo that cannot be decoded is skipped and named in the answer.
    pub fn attach(
        &mut self,
        embedder: Embedder,
        index: IndexSpec,
        progress: &ProgressBar,
    ) -> Result<Attached> {
        let missing = self.photos_without("embeddings", "model", &embedder.model_id)?;
        progress.set_length(missing.len() as u64);
        let mut embedded = 0;
        let unusable = self.in_batches(&missing, progress, |batch| {
            embedded += batch.len();
            self.store_embeddings(&embedder, batch)
        })?;
        let attached = Attached { embedded, unusable };
        let gallery = {
            let conn = self.conn();
            Gallery::load(&conn, &embedder.model_id, embedder.dim, index)?
        };
        *self.gallery.write().unwrap_or_else(|e| e.into_inner()) = Some(gallery);
        self.embedder = Some(embedder);
        Ok(attached)
    }

    /// The catalogue's photos, by name, without a row in `table` (embeddings or local
    /// features, keyed by `image`) whose `tag_column` holds `tag`: those of another model or
    /// other settings do not count.
    fn photos_without(&self, table: &str, tag_column: &str, tag: &str) -> Result<Vec<String>> {
        let conn = self.conn();
        let mut st = conn.prepare(&format!(
            "SELECT p.image FROM photos p LEFT JOIN {table} t
             ON t.image = p.image AND t.{tag_column} = ?1 WHERE t.image IS NULL ORDER BY p.image"
        ))?;
        let rows = st.query_map([tag], |r| r.get(0))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Decode the photos `names` and hand them to `store` in batches of at most [`SYNC_BATCH`]
    /// photos or [`SYNC_PIXELS`] pixels, so that memory stays bounded whatever is pending.
    /// Returns the photos that could not be decoded, as `NAME: why`; they are skipped.
    fn in_batches(
        &self,
        names: &[String],
        progress: &ProgressBar,
        mut store: impl FnMut(Vec<(String, image::RgbImage)>) -> Result<()>,
    ) -> Result<Vec<String>> {
        let mut unusable = Vec::new();
        let mut batch: Vec<(String, image::RgbImage)> = Vec::new();
        let mut pixels = 0;
        for (i, name) in names.iter().enumerate() {
            match crate::data::image::load_rgb(&self.images_dir().join(name)) {
                Ok(img) => {
                    pixels += u64::from(img.width()) * u64::from(img.height());
                    batch.push((name.clone(), img));
                }
                Err(e) => unusable.push(format!("{name}: {}", image_problem(&e))),
            }
            let last = i + 1 == names.len();
            if batch.len() == SYNC_BATCH || pixels >= SYNC_PIXELS || (last && !batch.is_empty()) {
                store(std::mem::take(&mut batch))?;
                pixels = 0;
            }
            progress.inc(1);
        }
        Ok(unusable)
    }

    /// Embed `batch` and store the embeddings in one transaction.
    fn store_embeddings(
        &self,
        embedder: &Embedder,
        batch: Vec<(String, image::RgbImage)>,
    ) -> Result<()> {
        let (names, images): (Vec<String>, Vec<image::RgbImage>) = batch.into_iter().unzip();
        let vectors = embedder.embed(images)?;
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        for (name, v) in names.iter().zip(vectors.chunks_exact(embedder.dim)) {
            store_embedding(&tx, name, &embedder.model_id, v)?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Keep an uploaded photo as pending: the file under a name made from its content (the same
    /// photo uploaded twice is kept once), and its row. Refuses what is not a usable image.
    pub fn store_upload(&self, upload: &str, bytes: &[u8], sighting: &Sighting) -> Result<String> {
        let image =
            decode_rgb(bytes).map_err(|m| invalid(format!("{upload}: not a usable image: {m}")))?;
        drop(image);
        let ext = if bytes.starts_with(&[0xFF, 0xD8]) {
            "jpg"
        } else {
            "png"
        };
        let name = format!("u{:016x}.{ext}", fnv1a(bytes, 0));
        let path = self.images_dir().join(&name);
        if !path.is_file() {
            fsio::write_bytes_atomic(&path, bytes)?;
        }
        let s = sighting.trimmed();
        self.conn().execute(
            &format!(
                "INSERT OR IGNORE INTO photos (image, date, place, photographer, added_at)
                 VALUES (?1, ?2, ?3, ?4, {NOW})"
            ),
            params![name, s.date, s.place, s.photographer],
        )?;
        Ok(name)
    }

    /// Identify an uploaded photo: keep it as pending, embed it, and rank the catalogue's
    /// individuals (the best `top`, each with its `photos_each` photos most like it).
    pub fn identify(
        &self,
        upload: &str,
        bytes: &[u8],
        sighting: &Sighting,
        top: usize,
        photos_each: usize,
    ) -> Result<Identification> {
        let embedder = self
            .embedder
            .as_ref()
            .context("this catalogue has no model attached")?;
        let name = self.store_upload(upload, bytes, sighting)?;
        let query = self.embedding_of(&name, embedder)?;
        let ranked: Vec<local::Ranked> = match &self.local {
            Some(local) => self.rerank(local, &name, &query, top, photos_each)?,
            None => {
                let guard = self.gallery.read().unwrap_or_else(|e| e.into_inner());
                let gallery = guard.as_ref().context("no search index")?;
                let ranked = gallery.rank(&query, top, photos_each)?;
                ranked.into_iter().map(|(c, p)| (c, p, None)).collect()
            }
        };
        let (individual_id, species) = {
            let conn = self.conn();
            let individual_id: Option<String> = conn.query_row(
                "SELECT individual_id FROM photos WHERE image = ?1",
                [&name],
                |r| r.get(0),
            )?;
            let species = ranked
                .iter()
                .map(|(c, _, _)| {
                    conn.query_row(
                        "SELECT species FROM individuals WHERE id = ?1",
                        [&c.id],
                        |r| r.get::<_, String>(0),
                    )
                    .optional()
                    .map(Option::unwrap_or_default)
                })
                .collect::<rusqlite::Result<Vec<_>>>()?;
            let individual_id = match individual_id {
                Some(id) => Some(resolve(&conn, &id)?),
                None => None,
            };
            (individual_id, species)
        };
        let candidates: Vec<Candidate> = ranked.iter().map(|(c, _, _)| c.clone()).collect();
        let calibration = self.local.as_ref().and_then(|l| l.calibration.as_ref());
        let threshold = calibration.map_or(embedder.threshold, |c| c.threshold);
        let ranked_by = match (&self.local, calibration) {
            (None, _) => "embedding",
            (Some(_), None) => "local",
            (Some(_), Some(_)) => "fused",
        };
        Ok(Identification {
            image: name,
            upload: upload.to_string(),
            individual_id,
            answers: answers(&candidates, threshold),
            new_individual: candidates.first().is_none_or(|c| c.score < threshold),
            threshold,
            ranked_by: ranked_by.to_string(),
            candidates: ranked
                .into_iter()
                .zip(species)
                .map(|((c, photos, local), species)| CandidateView {
                    individual_id: c.id,
                    species,
                    score: c.score,
                    photos,
                    local,
                })
                .collect(),
        })
    }

    /// The stored embedding of a photo by the attached model, made and stored when missing.
    fn embedding_of(&self, image: &str, embedder: &Embedder) -> Result<Vec<f32>> {
        let stored: Option<Vec<u8>> = self
            .conn()
            .query_row(
                "SELECT vector FROM embeddings WHERE image = ?1 AND model = ?2",
                params![image, embedder.model_id],
                |r| r.get(0),
            )
            .optional()?;
        if let Some(blob) = stored {
            return Ok(gallery::from_blob(&blob));
        }
        let rgb = crate::data::image::load_rgb(&self.images_dir().join(image))
            .map_err(|e| invalid(format!("{image}: {}", image_problem(&e))))?;
        let v = embedder.embed(vec![rgb])?;
        store_embedding(&self.conn(), image, &embedder.model_id, &v)?;
        Ok(v)
    }

    /// Record a decision by `by`; returns its record. A photo is decided once: deciding a photo
    /// that already has an individual is a conflict.
    pub fn decide(&self, decision: &Decision, by: &str, note: &str) -> Result<DecisionRecord> {
        let by = by.trim();
        if by.is_empty() {
            return Err(invalid("a decision needs the name of who made it ('by')"));
        }
        // The embedding is made before the write lock, so that decisions never wait on the model.
        let vector = match (decision, &self.embedder) {
            (Decision::Confirm { image, .. } | Decision::New { image, .. }, Some(e)) => {
                if !is_safe_name(image) || !self.images_dir().join(image).is_file() {
                    return Err(not_found(format!("no photo '{image}' in the catalogue")));
                }
                Some(self.embedding_of(image, e)?)
            }
            _ => None,
        };
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let (kind, image, id, other) = match decision {
            Decision::Confirm {
                image,
                individual_id,
            } => {
                pending_photo(&tx, image)?;
                let id = resolve(&tx, individual_id)?;
                assign(&tx, image, &id)?;
                ("confirm", image.as_str(), id, String::new())
            }
            Decision::New {
                image,
                individual_id,
                species,
            } => {
                pending_photo(&tx, image)?;
                let id = match individual_id.as_deref().map(str::trim) {
                    Some(id) if !id.is_empty() => {
                        if !is_safe_name(id) || id == NEW_INDIVIDUAL {
                            return Err(invalid(format!(
                                "'{id}' cannot be an individual id (letters, digits, '.', '_', '-')"
                            )));
                        }
                        if exists(&tx, id)? {
                            return Err(conflict(format!("individual '{id}' already exists")));
                        }
                        id.to_string()
                    }
                    _ => loop {
                        let id = format!("fp-{:012x}", rand::thread_rng().gen::<u64>() >> 16);
                        if !exists(&tx, &id)? {
                            break id;
                        }
                    },
                };
                tx.execute(
                    &format!(
                        "INSERT INTO individuals (id, species, created_at, created_by)
                         VALUES (?1, ?2, {NOW}, ?3)"
                    ),
                    params![id, species.as_deref().unwrap_or("").trim(), by],
                )?;
                assign(&tx, image, &id)?;
                ("new", image.as_str(), id, String::new())
            }
            Decision::Merge { from, into } => {
                let from = resolve(&tx, from)?;
                let into = resolve(&tx, into)?;
                if from == into {
                    return Err(conflict(format!(
                        "'{from}' and '{into}' are one individual"
                    )));
                }
                tx.execute(
                    "UPDATE individuals SET merged_into = ?2 WHERE id = ?1",
                    params![from, into],
                )?;
                ("merge", "", into, from)
            }
        };
        let seq = {
            tx.execute(
                &format!(
                    "INSERT INTO decisions (kind, image, individual_id, other_id, decided_by,
                     decided_at, note) VALUES (?1, ?2, ?3, ?4, ?5, {NOW}, ?6)"
                ),
                params![kind, image, id, other, by, note.trim()],
            )?;
            tx.last_insert_rowid()
        };
        let record = decision_row(&tx, seq)?;
        tx.commit()?;
        // The index changes under the write lock too, in the order of the commits.
        let mut guard = self.gallery.write().unwrap_or_else(|e| e.into_inner());
        if let Some(gallery) = guard.as_mut() {
            match decision {
                Decision::Merge { .. } => gallery.merge(&record.other_id, &record.individual_id),
                _ => {
                    if let Some(v) = &vector {
                        gallery.add(&record.image, &record.individual_id, v)?;
                    }
                }
            }
        }
        Ok(record)
    }

    /// Every individual not merged into another, by id.
    pub fn individuals(&self) -> Result<Vec<IndividualSummary>> {
        let conn = self.conn();
        let aliases = alias_map(&conn)?;
        let mut st = conn.prepare(
            "SELECT id, species, created_at, created_by FROM individuals
             WHERE merged_into IS NULL ORDER BY id",
        )?;
        let rows: Vec<(String, String, String, String)> = st
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?
            .collect::<rusqlite::Result<_>>()?;
        let mut counts: HashMap<String, (usize, Option<String>)> = HashMap::new();
        let mut st = conn.prepare(
            "SELECT individual_id, image FROM photos WHERE individual_id IS NOT NULL
             ORDER BY added_at, image",
        )?;
        let photos = st.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
        for p in photos {
            let (id, image) = p?;
            let e = counts.entry(canonical(&aliases, &id)).or_default();
            e.0 += 1;
            e.1.get_or_insert(image);
        }
        Ok(rows
            .into_iter()
            .map(|(id, species, created_at, created_by)| {
                let (photos, cover) = counts.remove(&id).unwrap_or_default();
                IndividualSummary {
                    aliases: aliases_of(&aliases, &id),
                    id,
                    species,
                    photos,
                    cover,
                    created_at,
                    created_by,
                }
            })
            .collect())
    }

    /// An individual's page; an id merged into another gives the survivor's page.
    pub fn individual(&self, id: &str) -> Result<IndividualDetail> {
        let conn = self.conn();
        let canonical_id = resolve(&conn, id)?;
        let aliases = alias_map(&conn)?;
        let mut members = aliases_of(&aliases, &canonical_id);
        members.push(canonical_id.clone());
        let (species, created_at, created_by) = conn.query_row(
            "SELECT species, created_at, created_by FROM individuals WHERE id = ?1",
            [&canonical_id],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )?;
        let mut sightings = Vec::new();
        let mut history = Vec::new();
        for m in &members {
            sightings.extend(select_photos(&conn, "WHERE individual_id = ?1", [m])?);
            history.extend(select_decisions(
                &conn,
                "WHERE individual_id = ?1 OR other_id = ?1",
                [m],
            )?);
        }
        sightings.sort_by(|a, b| {
            (
                b.sighting.date.as_str(),
                b.added_at.as_str(),
                b.image.as_str(),
            )
                .cmp(&(
                    a.sighting.date.as_str(),
                    a.added_at.as_str(),
                    a.image.as_str(),
                ))
        });
        history.sort_by_key(|d| d.seq);
        history.dedup_by_key(|d| d.seq);
        let mut oldest_first: Vec<&Photo> = sightings.iter().collect();
        oldest_first.sort_by(|a, b| (&a.added_at, &a.image).cmp(&(&b.added_at, &b.image)));
        Ok(IndividualDetail {
            summary: IndividualSummary {
                id: canonical_id.clone(),
                species,
                photos: sightings.len(),
                aliases: aliases_of(&aliases, &canonical_id),
                cover: oldest_first.first().map(|p| p.image.clone()),
                created_at,
                created_by,
            },
            requested: (canonical_id != id).then(|| id.to_string()),
            sightings,
            history,
        })
    }

    /// Every photo, by name.
    pub fn photos(&self) -> Result<Vec<Photo>> {
        select_photos(&self.conn(), "ORDER BY image", [])
    }

    /// Every decision, oldest first.
    pub fn decisions(&self) -> Result<Vec<DecisionRecord>> {
        select_decisions(&self.conn(), "ORDER BY seq", [])
    }

    pub fn counts(&self) -> Result<Counts> {
        let conn = self.conn();
        let count = |sql: &str| -> Result<usize> {
            Ok(conn.query_row(sql, [], |r| r.get::<_, i64>(0))? as usize)
        };
        Ok(Counts {
            individuals: count("SELECT COUNT(*) FROM individuals WHERE merged_into IS NULL")?,
            merged: count("SELECT COUNT(*) FROM individuals WHERE merged_into IS NOT NULL")?,
            photos: count("SELECT COUNT(*) FROM photos")?,
            pending: count("SELECT COUNT(*) FROM photos WHERE individual_id IS NULL")?,
            decisions: count("SELECT COUNT(*) FROM decisions")?,
            indexed: self
                .gallery
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .as_ref()
                .map_or(0, Gallery::len),
        })
    }

    /// SQLite's own check of the database file: `"ok"` when sound.
    pub fn integrity_check(&self) -> Result<String> {
        Ok(self
            .conn()
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))?)
    }
}

/// What is wrong with a catalogue photo, without the server's path to it.
fn image_problem(e: &crate::data::DataError) -> String {
    match e {
        crate::data::DataError::BadImage { message, .. } => {
            format!("not a usable image: {message}")
        }
        crate::data::DataError::Io { source, .. } => format!("cannot read: {source}"),
        other => other.to_string(),
    }
}

fn store_embedding(conn: &Connection, image: &str, model: &str, v: &[f32]) -> Result<()> {
    conn.execute(
        "INSERT OR REPLACE INTO embeddings (image, model, vector) VALUES (?1, ?2, ?3)",
        params![image, model, gallery::to_blob(v)],
    )?;
    Ok(())
}

fn exists(conn: &Connection, id: &str) -> Result<bool> {
    Ok(conn
        .query_row("SELECT 1 FROM individuals WHERE id = ?1", [id], |_| Ok(()))
        .optional()?
        .is_some())
}

/// The individual `id` stands for now: itself, or the one it was (transitively) merged into.
fn resolve(conn: &Connection, id: &str) -> Result<String> {
    let mut current = id.to_string();
    for _ in 0..1000 {
        let next: Option<Option<String>> = conn
            .query_row(
                "SELECT merged_into FROM individuals WHERE id = ?1",
                [&current],
                |r| r.get(0),
            )
            .optional()?;
        match next {
            None => return Err(not_found(format!("no individual '{id}' in the catalogue"))),
            Some(None) => return Ok(current),
            Some(Some(into)) => current = into,
        }
    }
    anyhow::bail!("individual '{id}': merges form a cycle")
}

/// Merged id → the id it was merged into.
fn alias_map(conn: &Connection) -> Result<HashMap<String, String>> {
    let mut st =
        conn.prepare("SELECT id, merged_into FROM individuals WHERE merged_into IS NOT NULL")?;
    let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

fn canonical(aliases: &HashMap<String, String>, id: &str) -> String {
    let mut seen = HashSet::new();
    let mut current = id;
    while let Some(next) = aliases.get(current) {
        if !seen.insert(current) {
            break;
        }
        current = next;
    }
    current.to_string()
}

/// The ids that resolve to `id` (not itself), sorted.
fn aliases_of(aliases: &HashMap<String, String>, id: &str) -> Vec<String> {
    let mut out: Vec<String> = aliases
        .keys()
        .filter(|a| canonical(aliases, a) == id)
        .cloned()
        .collect();
    out.sort();
    out
}

/// The photo must exist and have no individual yet.
fn pending_photo(conn: &Connection, image: &str) -> Result<()> {
    let owner: Option<Option<String>> = conn
        .query_row(
            "SELECT individual_id FROM photos WHERE image = ?1",
            [image],
            |r| r.get(0),
        )
        .optional()?;
    match owner {
        None => Err(not_found(format!("no photo '{image}' in the catalogue"))),
        Some(Some(id)) => Err(conflict(format!(
            "photo '{image}' was already decided: it shows '{id}'"
        ))),
        Some(None) => Ok(()),
    }
}

fn assign(conn: &Connection, image: &str, id: &str) -> Result<()> {
    conn.execute(
        "UPDATE photos SET individual_id = ?2,
         species = CASE WHEN species = '' THEN (SELECT species FROM individuals WHERE id = ?2)
                   ELSE species END
         WHERE image = ?1",
        params![image, id],
    )?;
    Ok(())
}

fn select_photos<P: rusqlite::Params>(
    conn: &Connection,
    tail: &str,
    params: P,
) -> Result<Vec<Photo>> {
    let mut st = conn.prepare(&format!(
        "SELECT image, individual_id, species, date, place, photographer, added_at FROM photos {tail}"
    ))?;
    let rows = st.query_map(params, |r| {
        Ok(Photo {
            image: r.get(0)?,
            individual_id: r.get(1)?,
            species: r.get(2)?,
            sighting: Sighting {
                date: r.get(3)?,
                place: r.get(4)?,
                photographer: r.get(5)?,
            },
            added_at: r.get(6)?,
        })
    })?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

fn select_decisions<P: rusqlite::Params>(
    conn: &Connection,
    tail: &str,
    params: P,
) -> Result<Vec<DecisionRecord>> {
    let mut st = conn.prepare(&format!(
        "SELECT seq, kind, image, individual_id, other_id, decided_by, decided_at, note
         FROM decisions {tail}"
    ))?;
    let rows = st.query_map(params, |r| {
        Ok(DecisionRecord {
            seq: r.get(0)?,
            kind: r.get(1)?,
            image: r.get(2)?,
            individual_id: r.get(3)?,
            other_id: r.get(4)?,
            decided_by: r.get(5)?,
            decided_at: r.get(6)?,
            note: r.get(7)?,
        })
    })?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

fn decision_row(conn: &Connection, seq: i64) -> Result<DecisionRecord> {
    select_decisions(conn, "WHERE seq = ?1", [seq])?
        .pop()
        .context("decision just written is missing")
}

#[cfg(test)]
mod tests;
