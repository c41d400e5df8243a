//! The data path: Kaggle-format CSVs and image folders, species names, folds and statistics.

mod csvfile;
pub mod folders;
pub mod folds;
pub mod image;
mod jpeg;
pub mod kaggle;
pub mod pseudo;
pub mod stats;

pub use csvfile::{CsvFile, CsvRow};
pub use folders::DataFolders;
pub use kaggle::{
    normalise_species, read_solution, read_submission, read_train_csv, write_solution,
    write_submission, write_train_csv, KaggleDir, Prediction, SolutionRow, TrainRow, TrainSet,
    NEW_INDIVIDUAL, SPECIES_FIXES,
};

use std::path::PathBuf;

/// An input the data path cannot use, named precisely enough for a person to fix it.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{path}: cannot read")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: no column '{column}' (the header has: {found})")]
    MissingColumn {
        path: PathBuf,
        column: String,
        found: String,
    },
    #[error("{path}:{line}: empty or missing field '{column}'")]
    MissingField {
        path: PathBuf,
        line: u64,
        column: String,
    },
    #[error("{path}:{line}: {message}")]
    BadRow {
        path: PathBuf,
        line: u64,
        message: String,
    },
    #[error("{path}: not a usable image: {message}")]
    BadImage { path: PathBuf, message: String },
}
