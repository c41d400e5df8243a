//! CSV files read by column name, whose errors name the file, the line and the column.

use super::DataError;
use std::path::{Path, PathBuf};

/// A whole CSV file with a header row, held in memory.
pub struct CsvFile {
    path: PathBuf,
    headers: csv::StringRecord,
    records: Vec<csv::StringRecord>,
}

impl CsvFile {
    pub fn read(path: &Path) -> Result<Self, DataError> {
        let io_err = |source| DataError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = std::fs::File::open(path).map_err(io_err)?;
        let mut reader = csv::ReaderBuilder::new()
            .flexible(true)
            .from_reader(std::io::BufReader::new(file));
        let bad = |e: csv::Error| DataError::BadRow {
            path: path.to_path_buf(),
            line: e.position().map_or(0, |p| p.line()),
            message: e.to_string(),
        };
        let headers = reader.headers().map_err(bad)?.clone();
        let records = reader
            .records()
            .collect::<Result<Vec<_>, _>>()
            .map_err(bad)?;
        // Short rows read as empty cells; a longer row has lost a quote or holds a stray comma,
        // and its cells would land in the wrong columns.
        if let Some(r) = records.iter().find(|r| r.len() > headers.len()) {
            return Err(DataError::BadRow {
                path: path.to_path_buf(),
                line: r.position().map_or(0, |p| p.line()),
                message: format!(
                    "{} fields, the header has {} (a comma in a name needs quotes)",
                    r.len(),
                    headers.len()
                ),
            });
        }
        Ok(Self {
            path: path.to_path_buf(),
            headers,
            records,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The index of the column called `name`, wherever it stands in the header.
    pub fn column(&self, name: &str) -> Result<usize, DataError> {
        self.find_column(name)
            .ok_or_else(|| DataError::MissingColumn {
                path: self.path.clone(),
                column: name.to_string(),
                found: self.headers.iter().collect::<Vec<_>>().join(","),
            })
    }

    /// The index of the column called `name`, if there is one.
    pub fn find_column(&self, name: &str) -> Option<usize> {
        self.headers.iter().position(|h| h.trim() == name)
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    pub fn rows(&self) -> impl Iterator<Item = CsvRow<'_>> {
        self.records
            .iter()
            .map(move |record| CsvRow { file: self, record })
    }
}

/// One data row of a [`CsvFile`].
pub struct CsvRow<'a> {
    file: &'a CsvFile,
    record: &'a csv::StringRecord,
}

impl CsvRow<'_> {
    /// The 1-based line of this row in its file.
    pub fn line(&self) -> u64 {
        self.record.position().map_or(0, |p| p.line())
    }

    /// The trimmed, non-empty field in column `col` (found with [`CsvFile::column`]).
    pub fn field(&self, col: usize) -> Result<&str, DataError> {
        let value = self.optional(col);
        if value.is_empty() {
            return Err(DataError::MissingField {
                path: self.file.path.clone(),
                line: self.line(),
                column: self.file.headers.get(col).unwrap_or("?").to_string(),
            });
        }
        Ok(value)
    }

    /// The trimmed field in column `col`, empty where the row is short or the cell is empty.
    pub fn optional(&self, col: usize) -> &str {
        self.record.get(col).map_or("", str::trim)
    }

    /// An error about this row.
    pub fn error(&self, message: impl Into<String>) -> DataError {
        DataError::BadRow {
            path: self.file.path.clone(),
            line: self.line(),
            message: message.into(),
        }
    }
}
