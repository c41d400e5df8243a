//! `finprint compare`: the per-query outcomes that `evaluate --queries` wrote, pooled over the
//! folds of a cross-validation (one table per fold), as one evaluation over all their animals:
//! each system's top-1, top-5 and MAP@5 with bootstrap intervals over animals, and each one's
//! paired gain over the first.

use crate::crossval::{means, outcome, Bootstrap, Difference};
use crate::data::CsvFile;
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

/// `finprint compare`.
#[derive(Clone, Debug, clap::Args)]
pub struct CompareArgs {
    /// The systems, the first the baseline: each the tables of `evaluate --queries`, separated
    /// by commas (the folds, pooled), then `:COLUMN`, the rank column to read (default `rank`;
    /// `embedding_rank` is the embedding alone of a run with --local). Every system holds the
    /// same queries (image, animal).
    #[arg(required = true, num_args = 2.., value_name = "CSV[,CSV...][:COLUMN]")]
    pub systems: Vec<String>,
    /// Resamples of the animals for the 95% intervals.
    #[arg(long, default_value_t = 1000)]
    pub bootstrap: usize,
    /// Seed of the bootstrap's draws.
    #[arg(long, default_value_t = 0)]
    pub bootstrap_seed: u64,
    /// Also write the figures to this JSON file.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// One system's pooled figures and, after the first, its paired gain over the first.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct System {
    pub name: String,
    pub top1: f64,
    pub top5: f64,
    pub map5: f64,
    pub interval: Bootstrap,
    pub gain: Option<Difference>,
}

/// The comparison of [`CompareArgs::systems`] on their pooled queries.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Comparison {
    pub queries: usize,
    pub animals: usize,
    pub systems: Vec<System>,
}

/// A system's tables and rank column: `A.csv,B.csv:embedding_rank`.
fn parse_system(spec: &str) -> (Vec<PathBuf>, &str) {
    let (files, column) = match spec.rsplit_once(':') {
        Some((files, column))
            if !column.is_empty()
                && column
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_') =>
        {
            (files, column)
        }
        _ => (spec, "rank"),
    };
    (files.split(',').map(PathBuf::from).collect(), column)
}

/// A system's name as printed: its first table, how many more, and its column.
fn short_name(spec: &str) -> String {
    let (files, column) = parse_system(spec);
    let more = match files.len() {
        1 => String::new(),
        n => format!(" (+{} more)", n - 1),
    };
    format!("{}{more} {column}", files[0].display())
}

/// Each query (image) of a system's tables: its animal and rank of the truth (1–5, 0 beyond).
fn read_system(spec: &str) -> Result<BTreeMap<String, (String, usize)>> {
    let (files, column) = parse_system(spec);
    let mut queries = BTreeMap::new();
    for path in files {
        let csv = CsvFile::read(&path)?;
        let (image, animal, rank) = (
            csv.column("image")?,
            csv.column("animal")?,
            csv.column(column)?,
        );
        for row in csv.rows() {
            let value = row.field(rank)?;
            let r: usize = value
                .parse()
                .ok()
                .filter(|&r| r <= crate::metrics::K)
                .ok_or_else(|| row.error(format!("{column} {value:?} is not a rank 0–5")))?;
            let (name, animal) = (row.field(image)?, row.field(animal)?);
            if queries
                .insert(name.to_string(), (animal.to_string(), r))
                .is_some()
            {
                return Err(row
                    .error(format!(
                        "{name} is a query twice (a fold pooled twice, or the same photo in two folds)"
                    ))
                    .into());
            }
        }
    }
    Ok(queries)
}

/// Pool each system's tables and compare them on the same queries.
pub fn compare(args: &CompareArgs) -> Result<Comparison> {
    let mut tables = Vec::new();
    for spec in &args.systems {
        tables.push(read_system(spec).with_context(|| format!("reading {spec}"))?);
    }
    let first = &tables[0];
    for (spec, table) in args.systems.iter().zip(&tables).skip(1) {
        type Table = BTreeMap<String, (String, usize)>;
        let differ = |a: &Table, b: &Table| {
            a.iter()
                .find(|(image, (animal, _))| b.get(*image).is_none_or(|(other, _)| other != animal))
                .map(|(image, _)| image.clone())
        };
        if let Some(image) = differ(first, table).or_else(|| differ(table, first)) {
            bail!(
                "{spec} and {} do not hold the same queries: {image} is in one only, or its animal differs",
                args.systems[0]
            );
        }
    }
    let mut animals: Vec<&str> = first.values().map(|(a, _)| a.as_str()).collect();
    animals.sort_unstable();
    animals.dedup();
    let units: Vec<usize> = first
        .values()
        .map(|(a, _)| animals.binary_search(&a.as_str()).unwrap_or(0))
        .collect();
    let values: Vec<Vec<[f64; 3]>> = tables
        .iter()
        .map(|t| {
            t.values()
                .map(|&(_, r)| outcome(r.checked_sub(1)))
                .collect()
        })
        .collect();
    let (resamples, seed) = (args.bootstrap, args.bootstrap_seed);
    let systems = args
        .systems
        .iter()
        .zip(&values)
        .enumerate()
        .map(|(i, (name, v))| {
            let [top1, top5, map5] = means(v);
            System {
                name: short_name(name),
                top1,
                top5,
                map5,
                interval: Bootstrap::of(v, &units, animals.len(), resamples, seed),
                gain: (i > 0)
                    .then(|| Difference::of(v, &values[0], &units, animals.len(), resamples, seed)),
            }
        })
        .collect();
    let comparison = Comparison {
        queries: first.len(),
        animals: animals.len(),
        systems,
    };
    if let Some(path) = &args.json {
        crate::fsio::write_bytes_atomic(
            path,
            serde_json::to_string_pretty(&comparison)?.as_bytes(),
        )?;
    }
    Ok(comparison)
}

impl fmt::Display for Comparison {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} queries of {} animals", self.queries, self.animals)?;
        let range = |v: [f64; 2]| format!("{:.3}–{:.3}", v[0], v[1]);
        let signed = |v: [f64; 2]| format!("{:+.3} to {:+.3}", v[0], v[1]);
        for s in &self.systems {
            let i = &s.interval;
            write!(
                f,
                "\n{}\n  top-1 {:.3} ({})  top-5 {:.3} ({})  MAP@5 {:.3} ({})",
                s.name,
                s.top1,
                range(i.top1),
                s.top5,
                range(i.top5),
                s.map5,
                range(i.map5)
            )?;
            if let Some(d) = &s.gain {
                let i = &d.interval;
                write!(
                    f,
                    "\n  gain over the first: top-1 {:+.3} ({})  top-5 {:+.3} ({})  MAP@5 {:+.3} ({})",
                    d.top1,
                    signed(i.top1),
                    d.top5,
                    signed(i.top5),
                    d.map5,
                    signed(i.map5)
                )?;
            }
        }
        write!(
            f,
            "\n95% intervals: {} resamples of the animals; gains paired (the same animals drawn for both)",
            self.systems[0].interval.resamples
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(dir: &std::path::Path, name: &str, text: &str) -> String {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    }

    fn args(systems: Vec<String>) -> CompareArgs {
        CompareArgs {
            systems,
            bootstrap: 200,
            bootstrap_seed: 1,
            json: None,
        }
    }

    #[test]
    fn folds_pool_into_one_evaluation_with_hand_computed_figures() {
        let dir = tempfile::tempdir().unwrap();
        // Two folds of a run with local features: rank (fused) and embedding_rank.
        let a = table(
            dir.path(),
            "fold0.csv",
            "image,animal,rank,embedding_rank\na.jpg,x,1,2\nb.jpg,x,2,0\n",
        );
        let b = table(
            dir.path(),
            "fold1.csv",
            "image,animal,rank,embedding_rank\nc.jpg,y,0,0\nd.jpg,z,1,1\n",
        );
        let pooled = format!("{a},{b}");
        let c = compare(&args(vec![format!("{pooled}:embedding_rank"), pooled])).unwrap();
        assert_eq!((c.queries, c.animals), (4, 3));
        let [embedding, fused] = &c.systems[..] else {
            panic!("two systems")
        };
        assert_eq!(fused.name, format!("{a} (+1 more) rank"));
        // Embedding ranks 2, 0, 0, 1: top-1 1/4, top-5 2/4, MAP@5 (1/2 + 1)/4.
        assert_eq!(
            (embedding.top1, embedding.top5, embedding.map5),
            (0.25, 0.5, 0.375)
        );
        // Fused ranks 1, 2, 0, 1: top-1 2/4, top-5 3/4, MAP@5 (1 + 1/2 + 1)/4.
        assert_eq!((fused.top1, fused.top5, fused.map5), (0.5, 0.75, 0.625));
        let gain = fused.gain.as_ref().unwrap();
        assert_eq!((gain.top1, gain.top5, gain.map5), (0.25, 0.25, 0.25));
        assert!(embedding.gain.is_none());
        // Every draw's gain lies between animal y's 0 and animal x's +1/2 (top-1).
        assert!(gain.interval.top1[0] >= 0.0 && gain.interval.top1[1] <= 0.5);
        assert_eq!(gain.interval.units, 3);
    }

    #[test]
    fn a_system_against_itself_gains_exactly_zero() {
        let dir = tempfile::tempdir().unwrap();
        let a = table(
            dir.path(),
            "q.csv",
            "image,animal,rank\na,x,1\nb,y,3\nc,y,0\n",
        );
        let c = compare(&args(vec![a.clone(), a])).unwrap();
        let gain = c.systems[1].gain.as_ref().unwrap();
        assert_eq!((gain.top1, gain.map5), (0.0, 0.0));
        assert_eq!(gain.interval.top1, [0.0, 0.0]);
    }

    #[test]
    fn mismatched_queries_and_bad_rows_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let a = table(dir.path(), "a.csv", "image,animal,rank\na,x,1\nb,y,3\n");
        let b = table(dir.path(), "b.csv", "image,animal,rank\na,x,1\n");
        let e = compare(&args(vec![a.clone(), b])).unwrap_err().to_string();
        assert!(
            e.contains("b.csv") && e.contains("not hold the same queries") && e.contains("b"),
            "{e}"
        );
        let bad = table(
            dir.path(),
            "bad.csv",
            "image,animal,rank\na,x,1\nb,y,seven\n",
        );
        let e = format!("{:#}", compare(&args(vec![a.clone(), bad])).unwrap_err());
        assert!(e.contains("bad.csv") && e.contains("seven"), "{e}");
        let e = format!(
            "{:#}",
            compare(&args(vec![format!("{a},{a}"), a.clone()])).unwrap_err()
        );
        assert!(e.contains("a query twice"), "{e}");
        let e = format!(
            "{:#}",
            compare(&args(vec![format!("{a}:nope"), a])).unwrap_err()
        );
        assert!(e.contains("nope"), "{e}");
    }
}
