//! What a catalogue holds: species, individuals, photos per individual, singletons.

use super::{read_train_csv, KaggleDir, TrainSet};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};

/// Photos-per-individual buckets reported by `finprint stats`: (lowest, highest) count.
const BUCKETS: &[(usize, usize)] = &[
    (1, 1),
    (2, 2),
    (3, 5),
    (6, 10),
    (11, 50),
    (51, 100),
    (101, usize::MAX),
];

#[derive(Clone, Debug, PartialEq)]
pub struct SpeciesStats {
    pub species: String,
    pub images: usize,
    pub individuals: usize,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Stats {
    pub images: usize,
    pub individuals: usize,
    /// Individuals with exactly one photo.
    pub singletons: usize,
    /// Most photos first.
    pub species: Vec<SpeciesStats>,
    /// Individuals per bucket of [`BUCKETS`].
    pub per_individual: Vec<usize>,
    pub max_per_individual: usize,
    pub median_per_individual: f64,
    /// (label as written, normalised) → rows.
    pub species_fixes: BTreeMap<(String, String), usize>,
}

/// `finprint stats`.
#[derive(Clone, Debug, clap::Args)]
pub struct StatsArgs {
    /// A folder with train.csv (Kaggle layout), or the CSV itself.
    #[arg(long)]
    pub data: PathBuf,
}

impl Stats {
    /// The statistics of `data`: a Kaggle folder or a `train.csv`.
    pub fn of_path(data: &Path) -> anyhow::Result<Self> {
        Ok(Self::of(&read_train_csv(&KaggleDir::train_csv_of(data))?))
    }

    pub fn of(set: &TrainSet) -> Self {
        let mut counts: HashMap<&str, usize> = HashMap::new();
        let mut species: BTreeMap<&str, (usize, HashSet<&str>)> = BTreeMap::new();
        for r in &set.rows {
            *counts.entry(&r.individual_id).or_default() += 1;
            let s = species.entry(&r.species).or_default();
            s.0 += 1;
            s.1.insert(&r.individual_id);
        }
        let mut sizes: Vec<usize> = counts.values().copied().collect();
        sizes.sort_unstable();
        let median = match sizes.len() {
            0 => 0.0,
            n if n % 2 == 1 => sizes[n / 2] as f64,
            n => (sizes[n / 2 - 1] + sizes[n / 2]) as f64 / 2.0,
        };
        let per_individual = BUCKETS
            .iter()
            .map(|&(lo, hi)| sizes.iter().filter(|&&n| n >= lo && n <= hi).count())
            .collect();
        let mut species: Vec<SpeciesStats> = species
            .into_iter()
            .map(|(name, (images, ids))| SpeciesStats {
                species: name.to_string(),
                images,
                individuals: ids.len(),
            })
            .collect();
        species.sort_by(|a, b| b.images.cmp(&a.images).then(a.species.cmp(&b.species)));
        Stats {
            images: set.rows.len(),
            individuals: sizes.len(),
            singletons: sizes.iter().filter(|&&n| n == 1).count(),
            species,
            per_individual,
            max_per_individual: sizes.last().copied().unwrap_or(0),
            median_per_individual: median,
            species_fixes: set.species_fixes.clone(),
        }
    }
}

impl fmt::Display for Stats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "images       {}", self.images)?;
        writeln!(f, "individuals  {}", self.individuals)?;
        writeln!(
            f,
            "singletons   {} (individuals seen once)",
            self.singletons
        )?;
        writeln!(f, "species      {}", self.species.len())?;
        writeln!(
            f,
            "photos per individual: median {}, max {}",
            self.median_per_individual, self.max_per_individual
        )?;
        for (&(lo, hi), n) in BUCKETS.iter().zip(&self.per_individual) {
            let label = match (lo, hi) {
                (lo, hi) if lo == hi => format!("{lo}"),
                (lo, usize::MAX) => format!("{lo}+"),
                (lo, hi) => format!("{lo}-{hi}"),
            };
            writeln!(f, "  {label:>7} photos  {n:>7} individuals")?;
        }
        writeln!(f, "{:<28} {:>8} {:>12}", "species", "images", "individuals")?;
        for s in &self.species {
            writeln!(f, "{:<28} {:>8} {:>12}", s.species, s.images, s.individuals)?;
        }
        if !self.species_fixes.is_empty() {
            writeln!(f, "species labels normalised:")?;
            for ((from, to), n) in &self.species_fixes {
                writeln!(f, "  {from} -> {to} ({n} rows)")?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::TrainRow;

    fn row(image: &str, species: &str, id: &str) -> TrainRow {
        TrainRow {
            image: image.into(),
            species: species.into(),
            individual_id: id.into(),
            encounter: None,
        }
    }

    #[test]
    fn counts_match_a_hand_count() {
        let set = TrainSet {
            rows: vec![
                row("1", "beluga", "a"),
                row("2", "beluga", "a"),
                row("3", "beluga", "a"),
                row("4", "beluga", "b"),
                row("5", "killer_whale", "c"),
                row("6", "killer_whale", "d"),
                row("7", "killer_whale", "d"),
            ],
            species_fixes: BTreeMap::new(),
        };
        let s = Stats::of(&set);
        assert_eq!((s.images, s.individuals, s.singletons), (7, 4, 2));
        assert_eq!(s.max_per_individual, 3);
        assert_eq!(s.median_per_individual, 1.5);
        assert_eq!(s.per_individual, vec![2, 1, 1, 0, 0, 0, 0]);
        assert_eq!(
            s.species[0],
            SpeciesStats {
                species: "beluga".into(),
                images: 4,
                individuals: 2
            }
        );
        assert_eq!(s.species[1].individuals, 2);
    }
}
