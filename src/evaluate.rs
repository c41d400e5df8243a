//! Evaluation as the field measures identification: every labelled photo queries the others
//! (leave-one-out), identities ranked by their best photo, with top-1, top-5 and MAP@5, and
//! bootstrap intervals that resample whole animals; the paired bootstrap compares two models on
//! the same queries.

use crate::data::{CsvFile, NEW_INDIVIDUAL};
use crate::embed::EmbedOptions;
use crate::fsio;
use crate::local::calibration::{rank_score, Fusion};
use crate::local::{Features, LocalArgs, Matcher};
use crate::metrics::{average_precision_at_5, K};
use crate::predict::{answers, best_threshold, Candidate};
use crate::runs::{Ensemble, ModelArgs, ZeroShot};
use crate::search::{rank_labels, recall, Aggregation, IndexSpec, Neighbor};

use anyhow::{Context, Result};
use indicatif::ProgressBar;
use rayon::prelude::*;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// `finprint evaluate`.
#[derive(Clone, Debug, clap::Args)]
pub struct EvaluateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// CSV with columns image,individual_id (image paths relative to --images).
    #[arg(long)]
    pub labels: PathBuf,
    /// The folder of the photos.
    #[arg(long)]
    pub images: PathBuf,
    /// A column whose value is part of the identity and restricts the gallery (e.g. view).
    #[arg(long)]
    pub group: Option<String>,
    /// A column (e.g. encounter) whose value a query's gallery never shares: photos taken
    /// minutes apart are not matched against each other. Queries whose identity has no photo
    /// outside their own value are new individuals there, and counted.
    #[arg(long, value_name = "COLUMN")]
    pub exclude_same: Option<String>,
    /// The new_individual threshold [default: the one the models saved; 0 for --zero-shot].
    #[arg(long)]
    pub threshold: Option<f32>,
    /// 95% bootstrap intervals from this many resamples of the animals (individual_id,
    /// whatever --group adds to the identity); 0 for none.
    #[arg(long, default_value_t = 0)]
    pub bootstrap: usize,
    /// Seed of the bootstrap's draws.
    #[arg(long, default_value_t = 0)]
    pub bootstrap_seed: u64,
    /// Also evaluate a pretrained backbone's zero-shot features on the same photos and give
    /// the gain over them, with 95% paired-bootstrap intervals (with --bootstrap).
    #[arg(long)]
    pub baseline: Option<String>,
    /// Also write the figures (and intervals) to this JSON file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// The search index: flat (exact), flat-f16 or hnsw[:M[,EF]]; an approximate one also
    /// reports its recall of the exact neighbours.
    #[arg(long, default_value_t = IndexSpec::default())]
    pub index: IndexSpec,
    #[command(flatten)]
    pub options: EmbedOptions,
    #[command(flatten)]
    pub local: LocalArgs,
    /// With --local: fuse it with the embedding by probabilities calibrated on these labelled
    /// photos (image,individual_id, in --images) of animals that are not evaluated; without,
    /// the shortlist is ranked by the local score alone.
    #[arg(long, value_name = "CSV")]
    pub calibration_labels: Option<PathBuf>,
}

/// What `finprint evaluate` found.
#[derive(Clone, Debug, Serialize)]
pub struct Evaluation {
    pub report: LooReport,
    pub bootstrap: Option<Bootstrap>,
    pub baseline: Option<Baseline>,
    /// With `--local`: the embedding's figures alone, and the gain of local re-scoring.
    pub local: Option<LocalGain>,
}

/// What local features add to the embedding, on the same queries.
#[derive(Clone, Debug, Serialize)]
pub struct LocalGain {
    pub embedding: LooReport,
    pub gain: Difference,
    /// Whether the local score was fused with the embedding (else it ranks the shortlist alone).
    pub fused: bool,
    pub cost: LocalCost,
}

/// The gain over a pretrained backbone's zero-shot features.
#[derive(Clone, Debug, Serialize)]
pub struct Baseline {
    pub backbone: String,
    pub report: LooReport,
    pub gain: Difference,
}

/// The labelled photos of an evaluation.
struct Labelled {
    names: Vec<String>,
    /// The identity of each photo: its animal, and its group when there is one.
    ids: Vec<String>,
    groups: Option<Vec<String>>,
    /// Each photo's value of the `--exclude-same` column.
    excluded: Option<Vec<String>>,
    /// Each photo's animal: the unit the bootstrap resamples.
    animals: Vec<String>,
}

fn read_labels(args: &EvaluateArgs, path: &Path) -> Result<Labelled> {
    let table = CsvFile::read(path)?;
    let (ci, cid) = (table.column("image")?, table.column("individual_id")?);
    let cg = args.group.as_deref().map(|g| table.column(g)).transpose()?;
    let cx = args
        .exclude_same
        .as_deref()
        .map(|c| table.column(c))
        .transpose()?;
    let mut l = Labelled {
        names: Vec::new(),
        ids: Vec::new(),
        groups: cg.map(|_| Vec::new()),
        excluded: cx.map(|_| Vec::new()),
        animals: Vec::new(),
    };
    for row in table.rows() {
        if let (Some(c), Some(excluded)) = (cx, l.excluded.as_mut()) {
            excluded.push(row.field(c)?.to_string());
        }
        let animal = row.field(cid)?.to_string();
        l.names.push(row.field(ci)?.to_string());
        match (cg, l.groups.as_mut()) {
            (Some(c), Some(groups)) => {
                let g = row.field(c)?;
                l.ids.push(match g.is_empty() {
                    true => animal.clone(),
                    false => format!("{animal}/{g}"),
                });
                groups.push(g.to_string());
            }
            _ => l.ids.push(animal.clone()),
        }
        l.animals.push(animal);
    }
    Ok(l)
}

/// Evaluate the models of `args` by leave-one-out over the labelled photos.
pub fn run(args: &EvaluateArgs, progress: &ProgressBar) -> Result<Evaluation> {
    let spec = args.model.spec();
    let ensemble = spec.load(args.threshold, crate::runtime::device())?;
    let labelled = read_labels(args, &args.labels)?;
    let sets = args.options.crop_sets(&spec)?;
    let local = match args.local.enabled() {
        true => Some(LocalScores::extract(
            &args.local,
            &args.images,
            &labelled.names,
            progress,
        )?),
        false => None,
    };
    let fusion = match (&local, &args.calibration_labels) {
        (Some(_), Some(path)) => Some(calibrate(args, path, &ensemble, &sets, progress)?),
        _ => None,
    };
    let score = |local: &LocalScores, query: usize, shortlist: &[(usize, f32)]| {
        let verified = local.rescore(query, shortlist);
        shortlist
            .iter()
            .zip(verified)
            .map(|(&(_, cos), v)| rank_score(fusion.as_ref(), cos, v))
            .collect()
    };
    let local_score = local
        .as_ref()
        .map(|l| move |query: usize, shortlist: &[(usize, f32)]| score(l, query, shortlist));
    let rescorer = local_score.as_ref().map(|s| Rescorer {
        shortlist: args.local.shortlist,
        score: s,
    });
    let evaluate = |ensemble: &Ensemble, threshold: f32| {
        progress.reset();
        let emb = args
            .options
            .embed(ensemble, &sets, &args.images, &labelled.names, progress)?;
        let protocol = Protocol {
            groups: labelled.groups.as_deref(),
            exclude: labelled.excluded.as_deref(),
            threshold,
            index: args.index,
            rescore: None,
        };
        let embedding = leave_one_out(&emb, ensemble.dim(), &labelled.ids, &protocol)?;
        match &rescorer {
            None => Ok((embedding, None)),
            Some(r) => {
                let rescore = Some(r);
                let local = leave_one_out(
                    &emb,
                    ensemble.dim(),
                    &labelled.ids,
                    &Protocol {
                        rescore,
                        ..protocol
                    },
                )?;
                Ok::<_, anyhow::Error>((local, Some(embedding)))
            }
        }
    };
    let (resamples, seed) = (args.bootstrap, args.bootstrap_seed);
    let (report, embedding) = evaluate(&ensemble, ensemble.threshold)?;
    let local = match (embedding, &local) {
        (Some(embedding), Some(scores)) => Some(LocalGain {
            gain: report.paired_bootstrap(&embedding, &labelled.animals, resamples, seed)?,
            embedding,
            fused: fusion.is_some(),
            cost: scores.cost(args.local.shortlist),
        }),
        _ => None,
    };
    let bootstrap = (resamples > 0).then(|| report.bootstrap(&labelled.animals, resamples, seed));
    let baseline = match &args.baseline {
        Some(backbone) => {
            let features = ZeroShot::new(backbone);
            let zero_shot = Ensemble::zero_shot(&features, 0.0, crate::runtime::device())?;
            let (base, _) = evaluate(&zero_shot, report.threshold)?;
            let gain = report.paired_bootstrap(&base, &labelled.animals, resamples, seed)?;
            Some(Baseline {
                backbone: backbone.clone(),
                report: base,
                gain,
            })
        }
        None => None,
    };
    let evaluation = Evaluation {
        report,
        bootstrap,
        baseline,
        local,
    };
    if let Some(path) = &args.json {
        fsio::write_bytes_atomic(path, serde_json::to_string_pretty(&evaluation)?.as_bytes())?;
    }
    Ok(evaluation)
}

impl fmt::Display for Evaluation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let r = &self.report;
        write!(
            f,
            "{} photos, {} with another photo of their identity",
            r.queries, r.known_queries
        )?;
        match r.skipped {
            0 => writeln!(f)?,
            n => writeln!(
                f,
                " to be found by ({n} more have one only in their own encounter)"
            )?,
        }
        writeln!(
            f,
            "top-1 {:.4}  top-5 {:.4}  MAP@5 {:.4}  (identities ranked, known queries)",
            r.top1, r.top5, r.map5_known
        )?;
        write!(
            f,
            "MAP@5 {:.4} with new_individual at threshold {:.3} (best threshold here {:.3}: {:.4})",
            r.map5, r.threshold, r.best_threshold, r.best_map5
        )?;
        if let Some(recall) = r.recall {
            write!(f, "\nrecall of the exact nearest photos: {recall:.4}")?;
        }
        if let Some(b) = &self.bootstrap {
            write!(
                f,
                "\n95% intervals over {} animals ({} resamples): top-1 {:.4}–{:.4}  top-5 {:.4}–{:.4}  MAP@5 {:.4}–{:.4}",
                b.units, b.resamples, b.top1[0], b.top1[1], b.top5[0], b.top5[1], b.map5[0], b.map5[1]
            )?;
        }
        let ci = |v: [f64; 2]| match self.bootstrap {
            None => String::new(),
            Some(_) => format!(" ({:+.4} to {:+.4})", v[0], v[1]),
        };
        let gains = |d: &Difference| {
            format!(
                "top-1 {:+.4}{}  top-5 {:+.4}{}  MAP@5 {:+.4}{}",
                d.top1,
                ci(d.interval.top1),
                d.top5,
                ci(d.interval.top5),
                d.map5,
                ci(d.interval.map5)
            )
        };
        if let Some(local) = &self.local {
            let e = &local.embedding;
            write!(
                f,
                "\nthe embedding alone: top-1 {:.4}  top-5 {:.4}  MAP@5 {:.4}; local re-scoring{} gains {}",
                e.top1,
                e.top5,
                e.map5_known,
                if local.fused { " (fused, calibrated)" } else { "" },
                gains(&local.gain)
            )?;
            let c = &local.cost;
            write!(
                f,
                "\nlocal features: {:.0} keypoints, {:.0} KB per photo; {:.0} ms to decode and extract a photo, {:.0} ms to re-score a shortlist of {} (one core)",
                c.keypoints,
                c.bytes_per_photo / 1024.0,
                c.extract_ms,
                c.rescore_ms,
                c.shortlist
            )?;
        }
        if let Some(base) = &self.baseline {
            write!(
                f,
                "\ngain over zero-shot {} (MAP@5 {:.4}): {}",
                base.backbone,
                base.report.map5_known,
                gains(&base.gain)
            )?;
        }
        Ok(())
    }
}

/// The local features of every labelled photo, and the matcher that compares them.
struct LocalScores {
    matcher: Matcher,
    features: Vec<Features>,
    /// Nanoseconds spent (on one core) extracting, and re-scoring with the count of queries.
    extract_ns: u64,
    rescore_ns: AtomicU64,
    rescored: AtomicU64,
}

impl LocalScores {
    fn extract(
        args: &LocalArgs,
        images: &Path,
        names: &[String],
        progress: &ProgressBar,
    ) -> Result<Self> {
        let matcher = args.matcher();
        progress.reset();
        progress.set_length(names.len() as u64);
        progress.set_message("local features");
        let timed = names
            .par_iter()
            .map(|name| {
                let start = Instant::now();
                let image = crate::data::image::load_rgb(&images.join(name))?;
                let features = matcher.extract(&image);
                progress.inc(1);
                Ok((features, start.elapsed().as_nanos() as u64))
            })
            .collect::<Result<Vec<_>>>()?;
        let extract_ns = timed.iter().map(|t| t.1).sum();
        Ok(LocalScores {
            matcher,
            features: timed.into_iter().map(|t| t.0).collect(),
            extract_ns,
            rescore_ns: AtomicU64::new(0),
            rescored: AtomicU64::new(0),
        })
    }

    /// The shortlisted photos' verified LNBNN votes against the query.
    fn rescore(&self, query: usize, shortlist: &[(usize, f32)]) -> Vec<f32> {
        let start = Instant::now();
        let gallery: Vec<&Features> = shortlist.iter().map(|&(j, _)| &self.features[j]).collect();
        let scores = self
            .matcher
            .rescore(&self.features[query], &gallery)
            .into_iter()
            .map(|m| m.verified)
            .collect();
        let elapsed = start.elapsed().as_nanos() as u64;
        self.rescore_ns.fetch_add(elapsed, Ordering::Relaxed);
        self.rescored.fetch_add(1, Ordering::Relaxed);
        scores
    }

    fn cost(&self, shortlist: usize) -> LocalCost {
        let photos = self.features.len().max(1) as f64;
        let keypoints = self.features.iter().map(Features::len).sum::<usize>() as f64 / photos;
        let per_keypoint = (2 + crate::local::sift::DESC_LEN) * std::mem::size_of::<f32>();
        LocalCost {
            shortlist,
            keypoints,
            bytes_per_photo: keypoints * per_keypoint as f64,
            extract_ms: self.extract_ns as f64 / 1e6 / photos,
            rescore_ms: self.rescore_ns.load(Ordering::Relaxed) as f64
                / 1e6
                / self.rescored.load(Ordering::Relaxed).max(1) as f64,
        }
    }
}

/// What local features cost, on one core.
#[derive(Clone, Debug, Serialize)]
pub struct LocalCost {
    pub shortlist: usize,
    /// Mean keypoints kept per photo, and the bytes they take (f32 positions and descriptors).
    pub keypoints: f64,
    pub bytes_per_photo: f64,
    /// Mean milliseconds to decode a photo and extract its features.
    pub extract_ms: f64,
    /// Mean milliseconds to re-score one query's shortlist (LNBNN and RANSAC).
    pub rescore_ms: f64,
}

/// Fit the fusion of the embedding with local matching on the photos of `path` (animals not
/// evaluated): every photo queries the others as in the evaluation, and each shortlisted photo
/// gives a pair (cosine, verified votes, same individual).
fn calibrate(
    args: &EvaluateArgs,
    path: &Path,
    ensemble: &Ensemble,
    sets: &[crate::crops::LoadedCropSet],
    progress: &ProgressBar,
) -> Result<Fusion> {
    let labelled = read_labels(args, path)?;
    let local = LocalScores::extract(&args.local, &args.images, &labelled.names, progress)?;
    progress.reset();
    let emb = args
        .options
        .embed(ensemble, sets, &args.images, &labelled.names, progress)?;
    let pairs = std::sync::Mutex::new(Vec::new());
    let record = |query: usize, shortlist: &[(usize, f32)]| {
        let verified = local.rescore(query, shortlist);
        let mut found: Vec<(f32, f32, bool)> = shortlist
            .iter()
            .zip(&verified)
            .map(|(&(j, cos), &v)| (cos, v, labelled.ids[j] == labelled.ids[query]))
            .collect();
        pairs
            .lock()
            .expect("no panic while held")
            .append(&mut found);
        verified
    };
    let protocol = Protocol {
        groups: labelled.groups.as_deref(),
        exclude: labelled.excluded.as_deref(),
        threshold: 0.0,
        index: args.index,
        rescore: Some(&Rescorer {
            shortlist: args.local.shortlist,
            score: &record,
        }),
    };
    leave_one_out(&emb, ensemble.dim(), &labelled.ids, &protocol)?;
    let pairs = pairs.into_inner().expect("no panic while held");
    Fusion::fit(&pairs).with_context(|| {
        format!(
            "{}: the calibration needs shortlisted pairs of the same and of different animals",
            path.display()
        )
    })
}

/// Leave-one-out identification over a labelled set.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LooReport {
    pub queries: usize,
    /// Queries whose identity has another photo to be found by.
    pub known_queries: usize,
    /// Over the known queries, ranking identities only: top-1, top-5 and MAP@5.
    pub top1: f64,
    pub top5: f64,
    pub map5_known: f64,
    /// Over all queries, `new_individual` inserted at `threshold` (truth for lone photos).
    pub map5: f64,
    pub threshold: f32,
    /// The threshold that would have been best here, and its MAP@5 (an optimistic bound).
    pub best_threshold: f32,
    pub best_map5: f64,
    /// Queries whose identity has other photos only where the query's gallery may not look
    /// (its own encounter, with `--exclude-same`): new individuals to that gallery.
    pub skipped: usize,
    /// With an approximate index: the share of each query's exact nearest photos it found.
    pub recall: Option<f64>,
    /// Each known query's row in `ids` and the rank of its true identity among its first
    /// five candidates (`None` when not among them): what `bootstrap` resamples.
    #[serde(skip)]
    pub known_ranks: Vec<(usize, Option<usize>)>,
}

/// How [`leave_one_out`] searches.
#[derive(Clone, Copy, Default)]
pub struct Protocol<'a> {
    /// Each photo's group: part of its identity, and its gallery holds only its group.
    pub groups: Option<&'a [String]>,
    /// Each photo's value of a column (its encounter) that its gallery never shares.
    pub exclude: Option<&'a [String]>,
    /// The `new_individual` threshold on the (re-scored) scores.
    pub threshold: f32,
    pub index: IndexSpec,
    /// Re-scoring of each query's shortlist (local features).
    pub rescore: Option<&'a Rescorer<'a>>,
}

/// Re-scores the first `shortlist` photos the embedding found for a query: `score(query,
/// shortlisted)` takes rows of the labelled set (with their cosine to the query) and gives one
/// score per shortlisted row. Identities of the shortlist are ranked by these scores, ahead of
/// those found only beyond it.
pub struct Rescorer<'a> {
    pub shortlist: usize,
    #[allow(clippy::type_complexity)]
    pub score: &'a (dyn Fn(usize, &[(usize, f32)]) -> Vec<f32> + Sync),
}

/// Query every photo against all the others (of the same group, when `protocol.groups` is
/// given), searched through an index of kind `protocol.index`: `emb` is row-major
/// `[ids.len(), dim]` unit vectors. With `protocol.exclude`, a query's gallery holds no photo
/// with its own value there (its encounter): a query whose identity has photos in its own
/// encounter only is then a new individual, counted in [`LooReport::skipped`].
pub fn leave_one_out(
    emb: &[f32],
    dim: usize,
    ids: &[String],
    protocol: &Protocol,
) -> anyhow::Result<LooReport> {
    let Protocol {
        groups,
        exclude,
        threshold,
        index,
        rescore,
    } = *protocol;
    let n = ids.len();
    anyhow::ensure!(n > 1, "leave-one-out needs at least two photos, got {n}");
    let mut members: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for i in 0..n {
        members
            .entry(groups.map_or("", |g| g[i].as_str()))
            .or_default()
            .push(i);
    }
    let mut queries: Vec<(Vec<Candidate>, String)> = vec![(Vec::new(), String::new()); n];
    let mut recall_sum = (0.0, 0usize);
    let mut skipped = 0;
    let excluded = |i: usize| exclude.map_or("", |e| e[i].as_str());
    for rows in members.values() {
        let mut names: Vec<String> = rows.iter().map(|&i| ids[i].clone()).collect();
        names.sort();
        names.dedup();
        let labels: Vec<u32> = rows
            .iter()
            .map(|&i| names.binary_search(&ids[i]).map_or(0, |x| x as u32))
            .collect();
        let vectors: Vec<f32> = rows
            .iter()
            .flat_map(|&i| emb[i * dim..(i + 1) * dim].iter().copied())
            .collect();
        let mut count: HashMap<&str, usize> = HashMap::new();
        let mut count_within: HashMap<(&str, &str), usize> = HashMap::new();
        let mut largest_excluded: HashMap<&str, usize> = HashMap::new();
        for &i in rows {
            *count.entry(ids[i].as_str()).or_default() += 1;
            *count_within
                .entry((ids[i].as_str(), excluded(i)))
                .or_default() += 1;
            *largest_excluded.entry(excluded(i)).or_default() += 1;
        }
        // Deep enough that the photos a query may not see leave the usual depth.
        let hidden = match exclude {
            Some(_) => largest_excluded.values().copied().max().unwrap_or(0),
            None => 0,
        };
        let k = ((K * 20 + 1).max(101) + hidden).min(rows.len());
        let found = index.build_with(dim, &vectors)?.search(&vectors, k)?;
        if !index.is_exact() {
            let exact = IndexSpec::default().build_with(dim, &vectors)?;
            let e = exact.search(&vectors, k)?;
            recall_sum.0 += recall(&e, &found) * rows.len() as f64;
            recall_sum.1 += rows.len();
        }
        let ranked: Vec<Vec<(u32, f32)>> = found
            .into_par_iter()
            .enumerate()
            .map(|(local, neighbors)| {
                let i = rows[local];
                let others: Vec<_> = neighbors
                    .into_iter()
                    .filter(|nb| {
                        let j = rows[nb.id as usize];
                        j != i && (exclude.is_none() || excluded(j) != excluded(i))
                    })
                    .collect();
                match rescore {
                    None => rank_labels(&others, &labels, Aggregation::Max, K),
                    Some(r) => rescored(i, &others, r, rows, &labels),
                }
            })
            .collect();
        for (local, ranked) in ranked.into_iter().enumerate() {
            let i = rows[local];
            let candidates = ranked
                .into_iter()
                .map(|(l, score)| Candidate {
                    id: names[l as usize].clone(),
                    score,
                })
                .collect();
            let id = ids[i].as_str();
            let visible = match exclude {
                Some(_) => count[id] - count_within[&(id, excluded(i))],
                None => count[id] - 1,
            };
            if visible == 0 && count[id] > 1 {
                skipped += 1;
            }
            let truth = match visible {
                0 => NEW_INDIVIDUAL.to_string(),
                _ => ids[i].clone(),
            };
            queries[i] = (candidates, truth);
        }
    }
    let known: Vec<&(Vec<Candidate>, String)> = queries
        .iter()
        .filter(|(_, t)| t != NEW_INDIVIDUAL)
        .collect();
    let rank_of = |(c, t): &(Vec<Candidate>, String)| c.iter().position(|x| &x.id == t);
    let share = |f: &dyn Fn(Option<usize>) -> f64| {
        known.iter().map(|q| f(rank_of(q))).sum::<f64>() / known.len().max(1) as f64
    };
    let map_at = |t: f32| {
        queries
            .iter()
            .map(|(c, truth)| average_precision_at_5(truth, &answers(c, t)))
            .sum::<f64>()
            / n.max(1) as f64
    };
    let (best_threshold, best_map5) = best_threshold(&queries);
    Ok(LooReport {
        queries: n,
        known_queries: known.len(),
        top1: share(&|r| f64::from(u8::from(r == Some(0)))),
        top5: share(&|r| f64::from(u8::from(r.is_some_and(|r| r < K)))),
        map5_known: share(&|r| r.filter(|&r| r < K).map_or(0.0, |r| 1.0 / (r + 1) as f64)),
        map5: map_at(threshold),
        threshold,
        best_threshold,
        best_map5,
        skipped,
        recall: (!index.is_exact()).then(|| recall_sum.0 / recall_sum.1.max(1) as f64),
        known_ranks: queries
            .iter()
            .enumerate()
            .filter(|(_, (_, t))| t != NEW_INDIVIDUAL)
            .map(|(i, q)| (i, rank_of(q)))
            .collect(),
    })
}

/// The identities of a query's neighbours (`others`, embedding order, ids local to `rows`):
/// those of the first `r.shortlist` ranked by `r`'s scores, then those found only beyond.
fn rescored(
    query: usize,
    others: &[Neighbor],
    r: &Rescorer,
    rows: &[usize],
    labels: &[u32],
) -> Vec<(u32, f32)> {
    let (short, rest) = others.split_at(r.shortlist.min(others.len()));
    let global: Vec<(usize, f32)> = short
        .iter()
        .map(|nb| (rows[nb.id as usize], nb.score))
        .collect();
    let scores = (r.score)(query, &global);
    let short: Vec<Neighbor> = short
        .iter()
        .zip(scores)
        .map(|(nb, score)| Neighbor { id: nb.id, score })
        .collect();
    let mut ranked = rank_labels(&short, labels, Aggregation::Max, K);
    if ranked.len() < K {
        for (label, score) in rank_labels(rest, labels, Aggregation::Max, 2 * K) {
            if ranked.len() < K && !ranked.iter().any(|&(l, _)| l == label) {
                ranked.push((label, score.min(ranked.last().map_or(score, |l| l.1))));
            }
        }
    }
    ranked
}

/// 95% percentile-bootstrap intervals of the known queries' top-1, top-5 and MAP@5 (each
/// `[low, high]`), resampling whole units (animals) with replacement.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Bootstrap {
    pub resamples: usize,
    pub seed: u64,
    /// Units resampled: the distinct units of the known queries.
    pub units: usize,
    pub top1: [f64; 2],
    pub top5: [f64; 2],
    pub map5: [f64; 2],
}

impl Bootstrap {
    /// Intervals of the means of per-query top-1, top-5 and MAP@5 `values` (see
    /// [`bootstrap_means`]), `unit_count` distinct units.
    fn of(
        values: &[[f64; 3]],
        units: &[usize],
        unit_count: usize,
        resamples: usize,
        seed: u64,
    ) -> Self {
        let [top1, top5, map5] = bootstrap_means(values, units, resamples, seed);
        Bootstrap {
            resamples,
            seed,
            units: unit_count,
            top1,
            top5,
            map5,
        }
    }
}

impl LooReport {
    /// Each known query's unit (an index into the sorted distinct units, also returned) and its
    /// top-1, top-5 and MAP@5 values.
    fn known_values<'a>(&self, unit_of: &'a [String]) -> (Vec<&'a str>, Vec<usize>, Vec<[f64; 3]>) {
        let mut names: Vec<&str> = self
            .known_ranks
            .iter()
            .map(|&(i, _)| unit_of[i].as_str())
            .collect();
        names.sort_unstable();
        names.dedup();
        let (units, values) = self
            .known_ranks
            .iter()
            .map(|&(i, r)| {
                let hit = |ok: bool| f64::from(u8::from(ok));
                let unit = names.binary_search(&unit_of[i].as_str()).unwrap_or(0);
                let map = r.filter(|&r| r < K).map_or(0.0, |r| 1.0 / (r + 1) as f64);
                (
                    unit,
                    [hit(r == Some(0)), hit(r.is_some_and(|r| r < K)), map],
                )
            })
            .unzip();
        (names, units, values)
    }

    /// Bootstrap intervals over units, `unit_of[i]` naming the unit of row `i` of the `ids`
    /// given to `leave_one_out` (for nyala the animal, while the identity is animal + flank).
    pub fn bootstrap(&self, unit_of: &[String], resamples: usize, seed: u64) -> Bootstrap {
        let (names, units, values) = self.known_values(unit_of);
        Bootstrap::of(&values, &units, names.len(), resamples, seed)
    }

    /// How much better `self` does than `baseline` on the same photos: the differences of
    /// top-1, top-5 and MAP@5 over the known queries, with 95% intervals of a paired bootstrap
    /// (each resample draws units and compares both on the same queries), which is narrower
    /// than two separate intervals as an animal hard for one is usually hard for the other.
    pub fn paired_bootstrap(
        &self,
        baseline: &LooReport,
        unit_of: &[String],
        resamples: usize,
        seed: u64,
    ) -> anyhow::Result<Difference> {
        let same_queries = self.known_ranks.len() == baseline.known_ranks.len()
            && self
                .known_ranks
                .iter()
                .zip(&baseline.known_ranks)
                .all(|(a, b)| a.0 == b.0);
        anyhow::ensure!(same_queries, "the two evaluations have different queries");
        let (names, units, values) = self.known_values(unit_of);
        let (_, _, base) = baseline.known_values(unit_of);
        let diffs: Vec<[f64; 3]> = values
            .iter()
            .zip(&base)
            .map(|(a, b)| std::array::from_fn(|k| a[k] - b[k]))
            .collect();
        let mean = |k: usize| diffs.iter().map(|d| d[k]).sum::<f64>() / diffs.len().max(1) as f64;
        Ok(Difference {
            top1: mean(0),
            top5: mean(1),
            map5: mean(2),
            interval: Bootstrap::of(&diffs, &units, names.len(), resamples, seed),
        })
    }
}

/// Differences of top-1, top-5 and MAP@5 (known queries) between two evaluations of the same
/// photos, with their paired-bootstrap intervals.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Difference {
    pub top1: f64,
    pub top5: f64,
    pub map5: f64,
    pub interval: Bootstrap,
}

/// The 2.5% and 97.5% percentiles of the mean of `values` (one row per query, `unit[i]` the
/// unit of query `i`) when the units are drawn with replacement `resamples` times: each draw
/// takes as many units as there are, and its mean is over all the queries of the drawn units.
pub fn bootstrap_means<const M: usize>(
    values: &[[f64; M]],
    unit: &[usize],
    resamples: usize,
    seed: u64,
) -> [[f64; 2]; M] {
    use rand::{Rng, SeedableRng};
    let units = unit.iter().max().map_or(0, |&u| u + 1);
    let mut sums = vec![([0.0; M], 0usize); units];
    for (v, &u) in values.iter().zip(unit) {
        sums[u].1 += 1;
        for (s, x) in sums[u].0.iter_mut().zip(v) {
            *s += x;
        }
    }
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut draws: [Vec<f64>; M] = std::array::from_fn(|_| Vec::with_capacity(resamples));
    for _ in 0..resamples.max(1) {
        let mut total = [0.0; M];
        let mut count = 0;
        for _ in 0..units {
            let (s, n) = &sums[rng.gen_range(0..units)];
            total.iter_mut().zip(s).for_each(|(t, x)| *t += x);
            count += n;
        }
        for (d, t) in draws.iter_mut().zip(total) {
            d.push(t / count.max(1) as f64);
        }
    }
    draws.map(|mut d| {
        d.sort_by(f64::total_cmp);
        let at = |p: f64| d[((d.len() - 1) as f64 * p).round() as usize];
        [at(0.025), at(0.975)]
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exact(exclude: Option<&[String]>) -> Protocol<'_> {
        Protocol {
            exclude,
            threshold: -1.0,
            ..Default::default()
        }
    }

    #[test]
    fn equal_animals_give_a_zero_width_interval() {
        // Four animals with the same outcomes: every resample has the same mean.
        let values = vec![[1.0, 0.5]; 8];
        let unit = [0, 0, 1, 1, 2, 2, 3, 3];
        let ci = bootstrap_means(&values, &unit, 500, 1);
        assert_eq!(ci, [[1.0, 1.0], [0.5, 0.5]]);
    }

    #[test]
    fn two_animals_span_both_extremes() {
        // Draws of two animals: {a,a} mean 1 and {b,b} mean 0, each a quarter of the time.
        let ci = bootstrap_means(&[[1.0], [0.0]], &[0, 1], 1000, 3);
        assert_eq!(ci, [[0.0, 1.0]]);
    }

    #[test]
    fn the_interval_matches_the_normal_approximation() {
        // 100 animals, half always right: mean 0.5, standard error sqrt(0.25 / 100) = 0.05,
        // so the 95% interval is about 0.5 ± 0.098. The same seed gives the same interval.
        let values: Vec<[f64; 1]> = (0..100)
            .map(|i| [f64::from(u8::from(i % 2 == 0))])
            .collect();
        let unit: Vec<usize> = (0..100).collect();
        let [[lo, hi]] = bootstrap_means(&values, &unit, 4000, 7);
        assert!(
            (lo - 0.402).abs() < 0.02 && (hi - 0.598).abs() < 0.02,
            "{lo} {hi}"
        );
        assert_eq!(bootstrap_means(&values, &unit, 4000, 7), [[lo, hi]]);
    }

    #[test]
    fn leave_one_out_ranks_feed_the_bootstrap_by_animal() {
        // Animal a (identity x): photo 0 is nearer photo 3 of y than its own photo 1, so it
        // ranks x second; photo 1 ranks x first. Animal b (identity y): photo 2 ranks y first,
        // photo 3 second (behind x). Photo 4 is alone: a new individual, not a known query.
        let emb = [
            1.0, 0.0, //
            0.6, -0.8, //
            0.0, 1.0, //
            0.8, 0.6, //
            -1.0, 0.0,
        ];
        let ids: Vec<String> = ["x", "x", "y", "y", "z"].map(String::from).to_vec();
        let r = leave_one_out(&emb, 2, &ids, &exact(None)).unwrap();
        assert_eq!(r.known_queries, 4);
        assert_eq!(
            r.known_ranks,
            [(0, Some(1)), (1, Some(0)), (2, Some(0)), (3, Some(1))]
        );
        assert!((r.top1 - 0.5).abs() < 1e-12 && (r.map5_known - 0.75).abs() < 1e-12);
        assert_eq!(r.recall, None, "the exact index reports no recall");
        // An approximate index over five photos finds every neighbour: the same report, with
        // its recall of the exact neighbours.
        let hnsw = IndexSpec::Hnsw {
            m: 4,
            ef_search: 16,
        };
        let a = leave_one_out(
            &emb,
            2,
            &ids,
            &Protocol {
                index: hnsw,
                ..exact(None)
            },
        )
        .unwrap();
        assert_eq!(a.recall, Some(1.0));
        assert_eq!(LooReport { recall: None, ..a }, r);
        let animals: Vec<String> = ["a", "a", "b", "b", "c"].map(String::from).to_vec();
        paired_differences_resample_animals(&r, &animals);
        let b = r.bootstrap(&animals, 1000, 5);
        assert_eq!(b.units, 2);
        // Each animal has one query right and one second: every resample gives the same.
        assert_eq!(
            (b.top1, b.top5, b.map5),
            ([0.5, 0.5], [1.0, 1.0], [0.75, 0.75])
        );
    }

    #[test]
    fn excluding_the_same_encounter_hides_its_photos_and_counts_the_stranded() {
        // x has photos 0 and 1 in encounter e1 and photo 2 in e2; y has 3 (e3) and 4 (e4);
        // z has 5 and 6, both in e5. Photo 0 is nearest photo 1 (its own encounter), then 3.
        let emb = [
            1.0, 0.0, //
            0.99, 0.141, //
            0.6, 0.8, //
            0.95, -0.312, //
            0.9, -0.436, //
            -1.0, 0.0, //
            -0.99, 0.141,
        ];
        let ids: Vec<String> = ["x", "x", "x", "y", "y", "z", "z"]
            .map(String::from)
            .to_vec();
        let enc: Vec<String> = ["e1", "e1", "e2", "e3", "e4", "e5", "e5"]
            .map(String::from)
            .to_vec();
        let plain = leave_one_out(&emb, 2, &ids, &exact(None)).unwrap();
        assert_eq!(plain.known_queries, 7);
        assert_eq!(
            plain.known_ranks[0],
            (0, Some(0)),
            "photo 1 finds x for photo 0"
        );
        let r = leave_one_out(&emb, 2, &ids, &exact(Some(&enc))).unwrap();
        // z's photos see no other z: new individuals, counted as skipped; the rest are known.
        assert_eq!((r.known_queries, r.skipped), (5, 2));
        // Photo 0 may not see photo 1: y (photo 3, 0.95) comes before x (photo 2, 0.6).
        assert_eq!(r.known_ranks[0], (0, Some(1)));
        // Photo 2 (e2) still sees x's photos of e1.
        assert_eq!(r.known_ranks[2], (2, Some(0)));
    }

    /// Against a baseline that ranks photo 0's identity first (one better) and photo 2's
    /// third (two steps worse): differences over the 4 known queries, top-1 (−1 + 1) / 4 = 0,
    /// top-5 0, MAP@5 (1/2 − 1 + 1 − 1/3) / 4 = 1/24. Animal a's queries differ by −1/2 in
    /// MAP@5, b's by +2/3: resamples {a,a}, {a,b}, {b,b} span −1/4 … +1/3.
    fn paired_differences_resample_animals(r: &LooReport, animals: &[String]) {
        let mut baseline = r.clone();
        baseline.known_ranks = vec![(0, Some(0)), (1, Some(0)), (2, Some(2)), (3, Some(1))];
        let d = r.paired_bootstrap(&baseline, animals, 2000, 1).unwrap();
        assert!(d.top1.abs() < 1e-12 && d.top5.abs() < 1e-12, "{d:?}");
        assert!((d.map5 - 1.0 / 24.0).abs() < 1e-12, "{}", d.map5);
        let [lo, hi] = d.interval.map5;
        assert!(
            (lo + 0.25).abs() < 1e-12 && (hi - 1.0 / 3.0).abs() < 1e-12,
            "{lo} {hi}"
        );
        assert_eq!(d.interval.units, 2);
        let mut other = baseline;
        other.known_ranks.pop();
        assert!(r.paired_bootstrap(&other, animals, 10, 1).is_err());
    }
}
