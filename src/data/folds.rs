//! Deterministic k-fold splits by individual, with unseen individuals in every validation fold.
//!
//! Each individual has a home fold. When fold `f` validates, the individuals at home there
//! play one of two parts: a chosen share are *unseen* (all their photos are queries, none is
//! trained on, so the right answer is `new_individual`), the others are *known* (some photos
//! stay in training as their gallery, the rest are queries). All other folds train.
//!
//! Where the photos have encounters, a known individual's encounters go whole to its gallery
//! or to its queries, so a query is never matched against a photo taken minutes before it
//! (an individual seen in one encounter only stays all in training).

use super::{read_train_csv, KaggleDir, TrainRow};
use crate::fsio;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;

/// What a photo does when its individual's home fold validates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// Trained on even then: the known individual's gallery.
    Gallery,
    /// A query of an individual that also has gallery photos.
    Query,
    /// A query of an individual absent from training.
    Unseen,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Gallery => "gallery",
            Role::Query => "query",
            Role::Unseen => "unseen",
        }
    }
}

/// A photo's home fold and role.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FoldAssignment {
    pub fold: usize,
    pub role: Role,
}

/// Photo indices of one training run.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Split {
    pub train: Vec<usize>,
    pub val: Vec<usize>,
}

/// A stable 64-bit hash (FNV-1a), so that splits do not depend on the platform or the
/// standard library's hasher.
fn stable_hash(seed: u64, text: &str) -> u64 {
    let mut h = 0xcbf29ce484222325u64 ^ seed.wrapping_mul(0x9E3779B97F4A7C15);
    for b in text.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100000001b3);
    }
    h ^ (h >> 31)
}

/// Assign every photo of `rows` a home fold out of `folds` and a role; `new_share` of each
/// fold's individuals are unseen. Folds are balanced by photo count.
pub fn assign_folds(
    rows: &[TrainRow],
    folds: usize,
    new_share: f64,
    seed: u64,
) -> Vec<FoldAssignment> {
    assert!(folds >= 2, "k-fold needs at least 2 folds");
    let mut photos: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (i, row) in rows.iter().enumerate() {
        photos.entry(&row.individual_id).or_default().push(i);
    }
    // Largest individuals first, each onto the lightest fold: balanced photo counts.
    let mut individuals: Vec<(&str, Vec<usize>)> = photos.into_iter().collect();
    individuals.sort_by_key(|(id, p)| (std::cmp::Reverse(p.len()), stable_hash(seed, id)));
    let mut load = vec![0usize; folds];
    let mut members: Vec<Vec<(&str, Vec<usize>)>> = vec![Vec::new(); folds];
    for (id, p) in individuals {
        let f = (0..folds).min_by_key(|&f| (load[f], f)).unwrap_or(0);
        load[f] += p.len();
        members[f].push((id, p));
    }
    let mut out = vec![
        FoldAssignment {
            fold: 0,
            role: Role::Gallery
        };
        rows.len()
    ];
    for (fold, mut group) in members.into_iter().enumerate() {
        group.sort_by_key(|(id, _)| stable_hash(seed ^ 0x5eed, id));
        let unseen = (new_share.clamp(0.0, 1.0) * group.len() as f64).round() as usize;
        for (rank, (_, p)) in group.into_iter().enumerate() {
            let gallery = match rank < unseen {
                true => Vec::new(),
                false => gallery_photos(rows, &p, seed),
            };
            for &i in &p {
                let role = if rank < unseen {
                    Role::Unseen
                } else if gallery.contains(&i) {
                    Role::Gallery
                } else {
                    Role::Query
                };
                out[i] = FoldAssignment { fold, role };
            }
        }
    }
    out
}

/// The photos `p` of a known individual kept in training as its gallery: whole encounters (a
/// photo without one is an encounter of its own), in a seeded order, until they hold half its
/// photos (rounded up), leaving at least one encounter to query.
fn gallery_photos(rows: &[TrainRow], p: &[usize], seed: u64) -> Vec<usize> {
    let key = |i: usize| rows[i].encounter.as_deref().unwrap_or(&rows[i].image);
    let mut encounters: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for &i in p {
        encounters.entry(key(i)).or_default().push(i);
    }
    let mut order: Vec<(&str, Vec<usize>)> = encounters.into_iter().collect();
    order.sort_by_key(|(k, _)| stable_hash(seed, k));
    if order.len() == 1 {
        return p.to_vec();
    }
    let half = p.len().div_ceil(2);
    let mut gallery = Vec::new();
    for (_, photos) in order.iter().take(order.len() - 1) {
        if gallery.len() >= half {
            break;
        }
        gallery.extend(photos);
    }
    gallery
}

/// The training and validation photos when fold `fold` validates.
pub fn split(assignments: &[FoldAssignment], fold: usize) -> Split {
    let mut s = Split::default();
    for (i, a) in assignments.iter().enumerate() {
        if a.fold == fold && a.role != Role::Gallery {
            s.val.push(i);
        } else {
            s.train.push(i);
        }
    }
    s
}

/// `finprint folds`.
#[derive(Clone, Debug, clap::Args)]
pub struct FoldsArgs {
    /// A folder with train.csv (Kaggle layout), or the CSV itself.
    #[arg(long)]
    pub data: PathBuf,
    /// The CSV to write: image,individual_id,fold,role.
    #[arg(long)]
    pub out: PathBuf,
    /// Folds of the individuals (each animal's photos stay in one fold).
    #[arg(long, default_value_t = 5)]
    pub folds: usize,
    /// Share of each validation fold's individuals kept out of training.
    #[arg(long, default_value_t = 0.2)]
    pub new_share: f64,
    /// Seeds the assignment: the same seed gives the same folds on any machine.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// Write the fold assignment of `args.data` to `args.out`; returns each fold's split.
pub fn write(args: &FoldsArgs) -> anyhow::Result<Vec<Split>> {
    anyhow::ensure!(args.folds >= 2, "--folds must be at least 2");
    let set = read_train_csv(&KaggleDir::train_csv_of(&args.data))?;
    let assignments = assign_folds(&set.rows, args.folds, args.new_share, args.seed);
    fsio::write_atomic(&args.out, |w| {
        writeln!(w, "image,individual_id,fold,role")?;
        for (r, a) in set.rows.iter().zip(&assignments) {
            let role = a.role.as_str();
            writeln!(w, "{},{},{},{role}", r.image, r.individual_id, a.fold)?;
        }
        Ok(())
    })?;
    Ok((0..args.folds).map(|k| split(&assignments, k)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{HashMap, HashSet};

    /// 60 individuals with 1..=6 photos each.
    fn rows() -> Vec<TrainRow> {
        (0..60)
            .flat_map(|ind| {
                (0..=(ind % 6)).map(move |p| TrainRow {
                    image: format!("{ind}_{p}.jpg"),
                    species: "beluga".into(),
                    individual_id: format!("id{ind}"),
                    encounter: None,
                })
            })
            .collect()
    }

    #[test]
    fn individuals_stay_in_one_fold_and_folds_are_balanced() {
        let rows = rows();
        let a = assign_folds(&rows, 5, 0.2, 7);
        let mut home: HashMap<&str, usize> = HashMap::new();
        for (r, a) in rows.iter().zip(&a) {
            assert_eq!(*home.entry(&r.individual_id).or_insert(a.fold), a.fold);
        }
        let mut load = [0usize; 5];
        a.iter().for_each(|a| load[a.fold] += 1);
        let (min, max) = (load.iter().min().unwrap(), load.iter().max().unwrap());
        assert!(max - min <= 6, "unbalanced folds {load:?}");
    }

    #[test]
    fn unseen_individuals_are_absent_from_training_and_known_ones_present() {
        let rows = rows();
        let a = assign_folds(&rows, 5, 0.25, 3);
        let mut unseen_total = 0;
        for fold in 0..5 {
            let s = split(&a, fold);
            let train_ids: HashSet<&str> = s
                .train
                .iter()
                .map(|&i| rows[i].individual_id.as_str())
                .collect();
            for &i in &s.val {
                let id = rows[i].individual_id.as_str();
                match a[i].role {
                    Role::Unseen => assert!(!train_ids.contains(id)),
                    Role::Query => assert!(train_ids.contains(id)),
                    Role::Gallery => panic!("gallery photo in validation"),
                }
            }
            let unseen: HashSet<&str> = s
                .val
                .iter()
                .filter(|&&i| a[i].role == Role::Unseen)
                .map(|&i| rows[i].individual_id.as_str())
                .collect();
            unseen_total += unseen.len();
        }
        assert_eq!(unseen_total, 15, "a quarter of 60 individuals");
    }

    #[test]
    fn every_photo_validates_at_most_once_and_splits_partition() {
        let rows = rows();
        let a = assign_folds(&rows, 4, 0.2, 11);
        let mut validated = vec![0; rows.len()];
        for fold in 0..4 {
            let s = split(&a, fold);
            assert_eq!(s.train.len() + s.val.len(), rows.len());
            s.val.iter().for_each(|&i| validated[i] += 1);
        }
        assert!(validated.iter().all(|&n| n <= 1));
        let galleries = a.iter().filter(|a| a.role == Role::Gallery).count();
        assert_eq!(validated.iter().sum::<usize>() + galleries, rows.len());
    }

    #[test]
    fn same_seed_same_folds_other_seed_other_folds() {
        let rows = rows();
        assert_eq!(
            assign_folds(&rows, 5, 0.2, 1),
            assign_folds(&rows, 5, 0.2, 1)
        );
        assert_ne!(
            assign_folds(&rows, 5, 0.2, 1),
            assign_folds(&rows, 5, 0.2, 2)
        );
    }

    #[test]
    fn known_individuals_split_by_whole_encounters() {
        // Individual i has photo p in encounter p / 2: 1..=6 photos in 1..=3 encounters.
        let plain = rows();
        let rows: Vec<TrainRow> = plain
            .iter()
            .cloned()
            .map(|mut r| {
                let (ind, p) = r.image.trim_end_matches(".jpg").split_once('_').unwrap();
                let p: usize = p.parse().unwrap();
                r.encounter = Some(format!("{ind}-{}", p / 2));
                r
            })
            .collect();
        let a = assign_folds(&rows, 5, 0.2, 7);
        let mut enc_roles: HashMap<&str, HashSet<Role>> = HashMap::new();
        let mut queries = 0;
        for (r, a) in rows.iter().zip(&a) {
            enc_roles
                .entry(r.encounter.as_deref().unwrap())
                .or_default()
                .insert(a.role);
            queries += usize::from(a.role == Role::Query);
        }
        assert!(queries > 0);
        // No encounter is both gallery and query: a query never sees its own encounter.
        assert!(enc_roles.values().all(|roles| roles.len() == 1));
        // One encounter (at most two photos): kept whole in training, never queried.
        for (r, a) in rows.iter().zip(&a) {
            let photos = rows
                .iter()
                .filter(|o| o.individual_id == r.individual_id)
                .count();
            if photos <= 2 && a.role != Role::Unseen {
                assert_eq!(a.role, Role::Gallery, "{}", r.image);
            }
        }
        // Without encounters, the split is the one photos alone give.
        assert_eq!(
            assign_folds(&plain, 5, 0.2, 7),
            assign_folds(
                &plain
                    .iter()
                    .map(|r| TrainRow {
                        encounter: Some(r.image.clone()),
                        ..r.clone()
                    })
                    .collect::<Vec<_>>(),
                5,
                0.2,
                7
            )
        );
    }
}
