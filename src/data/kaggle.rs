//! The Kaggle Happywhale layout: `train.csv`, `train_images/`, `test_images/`,
//! `sample_submission.csv`, and the solution file that scores a submission.

use super::{CsvFile, CsvRow, DataError};
use crate::fsio;
use anyhow::{Context, Result};
use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};

/// The id a submission gives for an animal that is not in the catalogue.
pub const NEW_INDIVIDUAL: &str = "new_individual";

/// The species labels of the real `train.csv` that are typos or duplicate names, and the
/// label each one means.
pub const SPECIES_FIXES: &[(&str, &str)] = &[
    ("bottlenose_dolpin", "bottlenose_dolphin"),
    ("kiler_whale", "killer_whale"),
    ("globis", "short_finned_pilot_whale"),
    ("pilot_whale", "short_finned_pilot_whale"),
];

/// The canonical name of a species label.
pub fn normalise_species(label: &str) -> &str {
    SPECIES_FIXES
        .iter()
        .find(|(typo, _)| *typo == label)
        .map_or(label, |(_, fixed)| fixed)
}

/// The files of a dataset in Kaggle's layout.
#[derive(Clone, Debug)]
pub struct KaggleDir {
    pub root: PathBuf,
}

impl KaggleDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }
    pub fn train_csv(&self) -> PathBuf {
        self.root.join("train.csv")
    }
    /// `train.csv` inside the Kaggle folder `data`, or `data` itself when it names a file.
    pub fn train_csv_of(data: &Path) -> PathBuf {
        match data.is_dir() {
            true => KaggleDir::new(data).train_csv(),
            false => data.to_path_buf(),
        }
    }
    pub fn train_images(&self) -> PathBuf {
        self.root.join("train_images")
    }
    pub fn test_images(&self) -> PathBuf {
        self.root.join("test_images")
    }
    pub fn sample_submission(&self) -> PathBuf {
        self.root.join("sample_submission.csv")
    }
    /// The ground truth of the test images (written by `finprint synth`; Kaggle keeps its own).
    pub fn test_solution(&self) -> PathBuf {
        self.root.join("test_solution.csv")
    }
    /// True dorsal-fin boxes in the community format.
    pub fn fin_boxes(&self) -> PathBuf {
        self.root.join("fin_boxes.csv")
    }
}

/// One labelled photo of `train.csv`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrainRow {
    pub image: String,
    /// The normalised species label.
    pub species: String,
    pub individual_id: String,
    /// The sighting the photo belongs to (optional column `encounter`): photos taken minutes
    /// apart, which validation never matches against each other.
    pub encounter: Option<String>,
}

/// The rows of a `train.csv`, with the species labels that were normalised on reading.
#[derive(Clone, Debug, Default)]
pub struct TrainSet {
    pub rows: Vec<TrainRow>,
    /// (label as written, normalised label) → number of rows.
    pub species_fixes: BTreeMap<(String, String), usize>,
}

/// Read a `train.csv` (`image,species,individual_id`, in any column order, other columns
/// ignored), normalising species labels.
pub fn read_train_csv(path: &Path) -> Result<TrainSet, DataError> {
    let csv = CsvFile::read(path)?;
    let (image, species, individual) = (
        csv.column("image")?,
        csv.column("species")?,
        csv.column("individual_id")?,
    );
    let encounter = csv.find_column("encounter");
    let mut set = TrainSet::default();
    let mut seen = HashSet::new();
    for row in csv.rows() {
        let image = row.field(image)?;
        if !seen.insert(image.to_string()) {
            return Err(row.error(format!("image '{image}' is listed twice")));
        }
        let written = row.field(species)?;
        let fixed = normalise_species(written);
        if fixed != written {
            *set.species_fixes
                .entry((written.to_string(), fixed.to_string()))
                .or_default() += 1;
        }
        set.rows.push(TrainRow {
            image: image.to_string(),
            species: fixed.to_string(),
            individual_id: row.field(individual)?.to_string(),
            encounter: encounter
                .map(|c| row.field(c).map(str::to_string))
                .transpose()?
                .filter(|e| !e.is_empty()),
        });
    }
    Ok(set)
}

pub fn write_train_csv(path: &Path, rows: &[TrainRow]) -> Result<()> {
    fsio::write_atomic(path, |out| {
        writeln!(out, "image,species,individual_id")?;
        for r in rows {
            writeln!(out, "{},{},{}", r.image, r.species, r.individual_id)?;
        }
        Ok(())
    })
}

/// One row of a submission: an image and its ranked individual ids.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Prediction {
    pub image: String,
    pub ids: Vec<String>,
}

/// The rows of a CSV with a unique `image` column, each made into a value by `make` (given the
/// row and its image name).
fn read_by_image<T>(
    path: &Path,
    make: impl Fn(&CsvFile, &CsvRow, String) -> Result<T, DataError>,
) -> Result<Vec<T>, DataError> {
    let csv = CsvFile::read(path)?;
    let image = csv.column("image")?;
    let mut seen = HashSet::new();
    csv.rows()
        .map(|row| {
            let name = row.field(image)?.to_string();
            if !seen.insert(name.clone()) {
                return Err(row.error(format!("image '{name}' is listed twice")));
            }
            make(&csv, &row, name)
        })
        .collect()
}

/// Read a submission (`image,predictions`, ids separated by spaces).
pub fn read_submission(path: &Path) -> Result<Vec<Prediction>, DataError> {
    read_by_image(path, |csv, row, image| {
        let ids: Vec<String> = row
            .optional(csv.column("predictions")?)
            .split_whitespace()
            .map(str::to_string)
            .collect();
        if ids.len() > 5 {
            return Err(row.error(format!(
                "{} predictions for {image}: a submission names at most 5",
                ids.len()
            )));
        }
        Ok(Prediction { image, ids })
    })
}

/// Write a submission in Kaggle's format: at most five ids per image.
pub fn write_submission(path: &Path, predictions: &[Prediction]) -> Result<()> {
    fsio::write_atomic(path, |out| {
        writeln!(out, "image,predictions")?;
        for p in predictions {
            let ids: Vec<&str> = p.ids.iter().take(5).map(String::as_str).collect();
            writeln!(out, "{},{}", p.image, ids.join(" "))?;
        }
        Ok(())
    })
    .with_context(|| format!("writing submission {}", path.display()))
}

/// One row of a solution: the true individual of a test image (or `new_individual`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SolutionRow {
    pub image: String,
    pub individual_id: String,
}

/// Read a solution (`image,individual_id`).
pub fn read_solution(path: &Path) -> Result<Vec<SolutionRow>, DataError> {
    read_by_image(path, |csv, row, image| {
        Ok(SolutionRow {
            image,
            individual_id: row.field(csv.column("individual_id")?)?.to_string(),
        })
    })
}

pub fn write_solution(path: &Path, rows: &[SolutionRow]) -> Result<()> {
    fsio::write_atomic(path, |out| {
        writeln!(out, "image,individual_id")?;
        for r in rows {
            writeln!(out, "{},{}", r.image, r.individual_id)?;
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn reads_train_csv_in_any_column_order_and_fixes_species() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            dir.path(),
            "train.csv",
            "individual_id,image,species\nabc,1.jpg,kiler_whale\nabc,2.jpg,killer_whale\nx,3.jpg,globis\ny,4.jpg,pilot_whale\n",
        );
        let set = read_train_csv(&path).unwrap();
        assert_eq!(
            set.rows[0],
            TrainRow {
                image: "1.jpg".into(),
                species: "killer_whale".into(),
                individual_id: "abc".into(),
                encounter: None,
            }
        );
        let species: Vec<_> = set.rows.iter().map(|r| r.species.as_str()).collect();
        assert_eq!(
            species,
            [
                "killer_whale",
                "killer_whale",
                "short_finned_pilot_whale",
                "short_finned_pilot_whale"
            ]
        );
        assert_eq!(set.species_fixes.len(), 3);
        assert_eq!(
            set.species_fixes[&("kiler_whale".to_string(), "killer_whale".to_string())],
            1
        );
    }

    #[test]
    fn a_missing_field_names_file_line_and_column() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            dir.path(),
            "train.csv",
            "image,species,individual_id\n1.jpg,beluga,a\n2.jpg,beluga\n",
        );
        let err = read_train_csv(&path).unwrap_err().to_string();
        assert!(err.contains("train.csv:3"), "{err}");
        assert!(err.contains("individual_id"), "{err}");
    }

    #[test]
    fn a_missing_column_names_the_file_and_what_it_has() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "train.csv", "image,individual\n1.jpg,a\n");
        let err = read_train_csv(&path).unwrap_err().to_string();
        assert!(
            err.contains("train.csv")
                && err.contains("'species'")
                && err.contains("image,individual"),
            "{err}"
        );
    }

    #[test]
    fn a_missing_file_is_named() {
        let err = read_train_csv(Path::new("/nonexistent/train.csv"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("/nonexistent/train.csv"), "{err}");
    }

    #[test]
    fn submission_round_trip_keeps_five_ids() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub.csv");
        let preds = vec![
            Prediction {
                image: "a.jpg".into(),
                ids: ["1", "2", "new_individual", "3", "4", "5"]
                    .map(String::from)
                    .to_vec(),
            },
            Prediction {
                image: "b.jpg".into(),
                ids: vec!["9".into()],
            },
        ];
        write_submission(&path, &preds).unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "image,predictions\na.jpg,1 2 new_individual 3 4\nb.jpg,9\n"
        );
        let back = read_submission(&path).unwrap();
        assert_eq!(back[0].ids, ["1", "2", "new_individual", "3", "4"]);
        assert_eq!(back[1], preds[1]);
    }

    #[test]
    fn a_duplicated_image_is_an_error_with_its_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            dir.path(),
            "sub.csv",
            "image,predictions\na.jpg,1\na.jpg,2\n",
        );
        let err = read_submission(&path).unwrap_err().to_string();
        assert!(err.contains("sub.csv:3") && err.contains("a.jpg"), "{err}");
    }
}
