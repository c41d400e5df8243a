//! A catalogue in and out of files: a Kaggle folder (`train.csv` + `train_images/`) imported,
//! and the whole catalogue exported as CSVs plus its photos, which imports back unchanged.
//!
//! Export layout (also a Kaggle folder, so it trains as it is):
//!
//! | file | holds |
//! |---|---|
//! | `individuals.csv` | `id,species,merged_into,created_at,created_by` |
//! | `photos.csv` | `image,individual_id,species,date,place,photographer,added_at` (pending photos have no individual) |
//! | `decisions.csv` | `seq,kind,image,individual_id,other_id,decided_by,decided_at,note` |
//! | `train.csv` | `image,species,individual_id`: confirmed photos, merged ids resolved |
//! | `train_images/` | every photo |

use super::{alias_map, canonical, is_safe_name, select_decisions, select_photos, Catalog, NOW};
use crate::data::{read_train_csv, write_train_csv, CsvFile, KaggleDir, TrainRow};
use crate::fsio;
use anyhow::{Context, Result};
use indicatif::ProgressBar;
use rusqlite::{params, TransactionBehavior};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// What an import brought in, or an export wrote.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ImportSummary {
    pub individuals: usize,
    pub photos: usize,
    pub decisions: usize,
}

impl std::fmt::Display for ImportSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} individuals, {} photos and {} decisions",
            self.individuals, self.photos, self.decisions
        )
    }
}

/// `finprint catalog import`.
#[derive(Clone, Debug, clap::Args)]
pub struct ImportArgs {
    /// The catalogue folder (created when missing; it must hold no photo yet).
    #[arg(long)]
    pub catalog: PathBuf,
    /// A Kaggle folder (train.csv, train_images/) or a finprint export.
    #[arg(long)]
    pub from: PathBuf,
    /// Who the import decisions are recorded as.
    #[arg(long, default_value = "import")]
    pub by: String,
}

/// `finprint catalog import`: the import into `args.catalog`.
pub fn import(args: &ImportArgs, progress: &ProgressBar) -> Result<ImportSummary> {
    Catalog::open(&args.catalog)?.import(&args.from, &args.by, progress)
}

/// `finprint catalog export`: the export of `args.catalog`.
pub fn export(args: &ExportArgs, progress: &ProgressBar) -> Result<ImportSummary> {
    Catalog::open(&args.catalog)?.export(&args.out, progress)
}

/// `finprint catalog export`.
#[derive(Clone, Debug, clap::Args)]
pub struct ExportArgs {
    /// The catalogue folder.
    #[arg(long)]
    pub catalog: PathBuf,
    /// The folder to write: individuals.csv, photos.csv, decisions.csv, train.csv and
    /// train_images/ (imports back unchanged).
    #[arg(long)]
    pub out: PathBuf,
}

const INDIVIDUALS: [&str; 5] = ["id", "species", "merged_into", "created_at", "created_by"];
const PHOTOS: [&str; 7] = [
    "image",
    "individual_id",
    "species",
    "date",
    "place",
    "photographer",
    "added_at",
];
const DECISIONS: [&str; 8] = [
    "seq",
    "kind",
    "image",
    "individual_id",
    "other_id",
    "decided_by",
    "decided_at",
    "note",
];

/// Write a CSV with a header atomically.
fn write_csv(path: &Path, header: &[&str], rows: &[Vec<String>]) -> Result<()> {
    fsio::write_atomic(path, |out| {
        let mut w = csv::Writer::from_writer(out);
        w.write_record(header)?;
        for r in rows {
            w.write_record(r)?;
        }
        w.flush()?;
        Ok(())
    })
}

/// The rows of a CSV as maps of the named columns (each must be in the header).
fn read_csv(path: &Path, header: &[&str]) -> Result<Vec<Vec<String>>> {
    let csv = CsvFile::read(path)?;
    let cols = header
        .iter()
        .map(|c| csv.column(c))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(csv
        .rows()
        .map(|row| cols.iter().map(|&c| row.optional(c).to_string()).collect())
        .collect())
}

/// Copy photo `name` from `from` into the catalogue's images, atomically.
fn copy_image(from: &Path, name: &str, to: &Path) -> Result<()> {
    anyhow::ensure!(
        is_safe_name(name),
        "'{name}' cannot be a photo name (letters, digits, '.', '_', '-')"
    );
    let src = from.join(name);
    let bytes = std::fs::read(&src).with_context(|| format!("cannot read {}", src.display()))?;
    fsio::write_bytes_atomic(&to.join(name), &bytes)
}

impl Catalog {
    /// Import `dir` into this empty catalogue: a finprint export (with `individuals.csv`) as it
    /// was, or else a Kaggle folder, each photo recorded as an `import` decision by `by`.
    pub fn import(&self, dir: &Path, by: &str, progress: &ProgressBar) -> Result<ImportSummary> {
        let held = self.counts()?;
        anyhow::ensure!(
            held.photos == 0 && held.individuals + held.merged == 0,
            "catalogue {} is not empty ({} photos): import into a new folder",
            self.dir.display(),
            held.photos
        );
        let kaggle = KaggleDir::new(dir);
        if dir.join("individuals.csv").is_file() {
            self.import_export(&kaggle, progress)
        } else {
            self.import_kaggle(&kaggle, by, progress)
        }
        .with_context(|| format!("importing {}", dir.display()))
    }

    fn import_kaggle(
        &self,
        dir: &KaggleDir,
        by: &str,
        progress: &ProgressBar,
    ) -> Result<ImportSummary> {
        let set = read_train_csv(&dir.train_csv())?;
        progress.set_length(set.rows.len() as u64);
        for r in &set.rows {
            copy_image(&dir.train_images(), &r.image, &self.images_dir())?;
            progress.inc(1);
        }
        let mut species: BTreeMap<&str, &str> = BTreeMap::new();
        for r in &set.rows {
            species.entry(&r.individual_id).or_insert(&r.species);
        }
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        for (id, sp) in &species {
            tx.execute(
                &format!(
                    "INSERT INTO individuals (id, species, created_at, created_by)
                     VALUES (?1, ?2, {NOW}, ?3)"
                ),
                params![id, sp, by],
            )?;
        }
        let source = dir.train_csv().display().to_string();
        for r in &set.rows {
            tx.execute(
                &format!(
                    "INSERT INTO photos (image, individual_id, species, added_at)
                     VALUES (?1, ?2, ?3, {NOW})"
                ),
                params![r.image, r.individual_id, r.species],
            )?;
            tx.execute(
                &format!(
                    "INSERT INTO decisions (kind, image, individual_id, decided_by, decided_at,
                     note) VALUES ('import', ?1, ?2, ?3, {NOW}, ?4)"
                ),
                params![r.image, r.individual_id, by, source],
            )?;
        }
        tx.commit()?;
        Ok(ImportSummary {
            individuals: species.len(),
            photos: set.rows.len(),
            decisions: set.rows.len(),
        })
    }

    fn import_export(&self, dir: &KaggleDir, progress: &ProgressBar) -> Result<ImportSummary> {
        let individuals = read_csv(&dir.root.join("individuals.csv"), &INDIVIDUALS)?;
        let photos = read_csv(&dir.root.join("photos.csv"), &PHOTOS)?;
        let decisions = read_csv(&dir.root.join("decisions.csv"), &DECISIONS)?;
        progress.set_length(photos.len() as u64);
        for p in &photos {
            copy_image(&dir.train_images(), &p[0], &self.images_dir())?;
            progress.inc(1);
        }
        let null = |s: &String| (!s.is_empty()).then(|| s.clone());
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        for i in &individuals {
            anyhow::ensure!(is_safe_name(&i[0]), "'{}' cannot be an individual id", i[0]);
            tx.execute(
                "INSERT INTO individuals (id, species, created_at, created_by)
                 VALUES (?1, ?2, ?3, ?4)",
                params![i[0], i[1], i[3], i[4]],
            )
            .with_context(|| format!("individuals.csv: individual '{}'", i[0]))?;
        }
        for i in individuals.iter().filter(|i| !i[2].is_empty()) {
            tx.execute(
                "UPDATE individuals SET merged_into = ?2 WHERE id = ?1",
                params![i[0], i[2]],
            )
            .with_context(|| {
                format!("individuals.csv: '{}' merged into unknown '{}'", i[0], i[2])
            })?;
        }
        for p in &photos {
            tx.execute(
                "INSERT INTO photos (image, individual_id, species, date, place, photographer,
                 added_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![p[0], null(&p[1]), p[2], p[3], p[4], p[5], p[6]],
            )
            .with_context(|| format!("photos.csv: photo '{}' (of '{}')", p[0], p[1]))?;
        }
        for d in &decisions {
            let seq: i64 = d[0]
                .parse()
                .with_context(|| format!("decisions.csv: '{}' is not a sequence number", d[0]))?;
            tx.execute(
                "INSERT INTO decisions (seq, kind, image, individual_id, other_id, decided_by,
                 decided_at, note) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![seq, d[1], d[2], d[3], d[4], d[5], d[6], d[7]],
            )
            .with_context(|| format!("decisions.csv: decision {seq}"))?;
        }
        tx.commit()?;
        Ok(ImportSummary {
            individuals: individuals.len(),
            photos: photos.len(),
            decisions: decisions.len(),
        })
    }

    /// Write the whole catalogue to `out` (see the module's table).
    pub fn export(&self, out: &Path, progress: &ProgressBar) -> Result<ImportSummary> {
        let (individuals, photos, decisions, aliases) = {
            let conn = self.conn();
            let mut st = conn.prepare(
                "SELECT id, species, COALESCE(merged_into, ''), created_at, created_by
                 FROM individuals ORDER BY id",
            )?;
            let individuals: Vec<Vec<String>> = st
                .query_map([], |r| (0..5).map(|i| r.get(i)).collect())?
                .collect::<rusqlite::Result<_>>()?;
            (
                individuals,
                select_photos(&conn, "ORDER BY image", [])?,
                select_decisions(&conn, "ORDER BY seq", [])?,
                alias_map(&conn)?,
            )
        };
        let kaggle = KaggleDir::new(out);
        progress.set_length(photos.len() as u64);
        for p in &photos {
            copy_image(&self.images_dir(), &p.image, &kaggle.train_images())?;
            progress.inc(1);
        }
        write_csv(&out.join("individuals.csv"), &INDIVIDUALS, &individuals)?;
        let photo_rows: Vec<Vec<String>> = photos
            .iter()
            .map(|p| {
                vec![
                    p.image.clone(),
                    p.individual_id.clone().unwrap_or_default(),
                    p.species.clone(),
                    p.sighting.date.clone(),
                    p.sighting.place.clone(),
                    p.sighting.photographer.clone(),
                    p.added_at.clone(),
                ]
            })
            .collect();
        write_csv(&out.join("photos.csv"), &PHOTOS, &photo_rows)?;
        let decision_rows: Vec<Vec<String>> = decisions
            .iter()
            .map(|d| {
                vec![
                    d.seq.to_string(),
                    d.kind.clone(),
                    d.image.clone(),
                    d.individual_id.clone(),
                    d.other_id.clone(),
                    d.decided_by.clone(),
                    d.decided_at.clone(),
                    d.note.clone(),
                ]
            })
            .collect();
        write_csv(&out.join("decisions.csv"), &DECISIONS, &decision_rows)?;
        let train: Vec<TrainRow> = photos
            .iter()
            .filter_map(|p| {
                p.individual_id.as_ref().map(|id| TrainRow {
                    image: p.image.clone(),
                    species: if p.species.is_empty() {
                        "unknown".into()
                    } else {
                        p.species.clone()
                    },
                    individual_id: canonical(&aliases, id),
                    encounter: None,
                })
            })
            .collect();
        write_train_csv(&kaggle.train_csv(), &train)?;
        Ok(ImportSummary {
            individuals: individuals.len(),
            photos: photos.len(),
            decisions: decisions.len(),
        })
    }
}
