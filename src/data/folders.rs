//! Several Kaggle-layout folders trained on as one catalogue: `train --data A,B,C`.

use super::{read_train_csv, KaggleDir, TrainRow, TrainSet};
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// One or more folders in Kaggle's layout, written comma-separated (`beluga,rightwhale`).
///
/// With several, each folder's individual ids and encounters are prefixed with the folder's
/// name (`beluga/whale_017`): animals of different folders never merge, even where two sets
/// number their animals alike. A config writes one folder as a string, several as a list.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "OneOrMany", into = "OneOrMany")]
pub struct DataFolders(pub Vec<PathBuf>);

#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(PathBuf),
    Many(Vec<PathBuf>),
}

impl From<OneOrMany> for DataFolders {
    fn from(v: OneOrMany) -> Self {
        match v {
            OneOrMany::One(p) => Self(vec![p]),
            OneOrMany::Many(ps) => Self(ps),
        }
    }
}

impl From<DataFolders> for OneOrMany {
    fn from(d: DataFolders) -> Self {
        match <[PathBuf; 1]>::try_from(d.0) {
            Ok([one]) => OneOrMany::One(one),
            Err(many) => OneOrMany::Many(many),
        }
    }
}

impl FromStr for DataFolders {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let folders: Vec<PathBuf> = s
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(PathBuf::from)
            .collect();
        match folders.is_empty() {
            true => Err("names no folder".into()),
            false => Ok(Self(folders)),
        }
    }
}

impl fmt::Display for DataFolders {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<String> = self.0.iter().map(|p| p.display().to_string()).collect();
        f.write_str(&names.join(","))
    }
}

/// The labelled photos of one or more folders, each with the folder it is read from.
pub struct Labelled {
    pub set: TrainSet,
    /// The `train_images/` folder of each row of `set`.
    pub image_dirs: Vec<PathBuf>,
}

impl DataFolders {
    /// The folders made absolute, so that a run works from any working folder.
    pub fn absolute(&self) -> Result<Self> {
        self.0
            .iter()
            .map(|p| {
                std::path::absolute(p).with_context(|| format!("cannot resolve {}", p.display()))
            })
            .collect::<Result<_>>()
            .map(Self)
    }

    /// An error naming the first folder without a `train.csv`.
    pub fn check(&self) -> Result<()> {
        for dir in &self.0 {
            let csv = KaggleDir::new(dir).train_csv();
            anyhow::ensure!(
                csv.is_file(),
                "{}: no such file (--data takes folders in Kaggle's layout, comma-separated)",
                csv.display()
            );
        }
        Ok(())
    }

    /// Each folder's prefix: the fewest trailing components of its path that no other folder
    /// shares (`runs/beluga/data` and `runs/rightwhale/data` give `beluga/data` and
    /// `rightwhale/data`).
    pub fn prefixes(&self) -> Vec<String> {
        let parts: Vec<Vec<String>> = self
            .0
            .iter()
            .map(|p| {
                p.components()
                    .rev()
                    .map(|c| c.as_os_str().to_string_lossy().into_owned())
                    .collect()
            })
            .collect();
        let suffix = |i: usize, n: usize| -> String {
            let mut s: Vec<&str> = parts[i].iter().take(n).map(String::as_str).collect();
            s.reverse();
            s.join("/")
        };
        (0..parts.len())
            .map(|i| {
                let longest = parts[i].len().max(1);
                let n = (1..=longest)
                    .find(|&n| (0..parts.len()).all(|j| j == i || suffix(j, n) != suffix(i, n)))
                    .unwrap_or(longest);
                suffix(i, n)
            })
            .collect()
    }

    /// Read every folder's `train.csv` as one set. One folder reads as it is; several get
    /// their ids and encounters prefixed ([`DataFolders`]).
    pub fn read(&self) -> Result<Labelled> {
        let prefixes = self.prefixes();
        let mut set = TrainSet::default();
        let mut image_dirs = Vec::new();
        for (dir, prefix) in self.0.iter().zip(&prefixes) {
            let kaggle = KaggleDir::new(dir);
            let one = read_train_csv(&kaggle.train_csv())?;
            let tag = |s: &str| match self.0.len() {
                1 => s.to_string(),
                _ => format!("{prefix}/{s}"),
            };
            set.rows.extend(one.rows.iter().map(|r| TrainRow {
                image: r.image.clone(),
                species: r.species.clone(),
                individual_id: tag(&r.individual_id),
                encounter: r.encounter.as_deref().map(tag),
            }));
            image_dirs.extend(std::iter::repeat_n(kaggle.train_images(), one.rows.len()));
            for (fix, n) in one.species_fixes {
                *set.species_fixes.entry(fix).or_default() += n;
            }
        }
        Ok(Labelled { set, image_dirs })
    }

    /// The only folder, for what reads a single catalogue.
    pub fn single(&self) -> Option<&Path> {
        match self.0.as_slice() {
            [one] => Some(one),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, rows: &str) {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("train.csv"), rows).unwrap();
    }

    #[test]
    fn prefixes_are_the_shortest_distinct_suffixes() {
        let d: DataFolders = "runs/beluga/data, runs/rightwhale/data,synth"
            .parse()
            .unwrap();
        assert_eq!(d.prefixes(), ["beluga/data", "rightwhale/data", "synth"]);
        assert_eq!(d.to_string(), "runs/beluga/data,runs/rightwhale/data,synth");
        assert!(",".parse::<DataFolders>().is_err());
    }

    #[test]
    fn several_folders_keep_their_animals_apart() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
        write(
            &a,
            "image,species,individual_id,encounter\n1.jpg,beluga,w1,e1\n2.jpg,beluga,w2,e1\n",
        );
        write(&b, "image,species,individual_id\n1.jpg,kiler_whale,w1\n");
        let both = DataFolders(vec![a.clone(), b.clone()]);
        both.check().unwrap();
        let l = both.read().unwrap();
        let ids: Vec<(&str, &str, Option<&str>)> = l
            .set
            .rows
            .iter()
            .map(|r| {
                (
                    r.individual_id.as_str(),
                    r.species.as_str(),
                    r.encounter.as_deref(),
                )
            })
            .collect();
        assert_eq!(
            ids,
            [
                ("a/w1", "beluga", Some("a/e1")),
                ("a/w2", "beluga", Some("a/e1")),
                ("b/w1", "killer_whale", None)
            ]
        );
        assert_eq!(
            l.image_dirs,
            [
                a.join("train_images"),
                a.join("train_images"),
                b.join("train_images")
            ]
        );
        assert_eq!(l.set.species_fixes.values().sum::<usize>(), 1);
        let one = DataFolders(vec![b.clone()]).read().unwrap();
        assert_eq!(one.set.rows[0].individual_id, "w1");

        let missing = DataFolders(vec![a, tmp.path().join("c")])
            .check()
            .unwrap_err();
        assert!(missing.to_string().contains("c/train.csv"), "{missing}");
    }

    #[test]
    fn a_config_writes_one_folder_as_a_string_and_several_as_a_list() {
        let one = DataFolders(vec!["synth".into()]);
        assert_eq!(serde_json::to_string(&one).unwrap(), "\"synth\"");
        let two: DataFolders = "x,y".parse().unwrap();
        let json = serde_json::to_string(&two).unwrap();
        assert_eq!(json, "[\"x\",\"y\"]");
        assert_eq!(serde_json::from_str::<DataFolders>(&json).unwrap(), two);
        assert_eq!(
            serde_json::from_str::<DataFolders>("\"synth\"").unwrap(),
            one
        );
    }
}
