//! A synthetic catalogue in Kaggle's layout: rendered photos of dorsal fins whose marks identify
//! the animal, with photos per individual drawn from the real long-tailed distribution.
//!
//! Same configuration and seed, same bytes: individuals are drawn in order from one seeded
//! generator, and each photo is rendered from its own seed, so photos render in parallel.

pub mod render;

use crate::crops::BoxPx;
use crate::data::{
    write_solution, write_submission, write_train_csv, KaggleDir, Prediction, SolutionRow,
    TrainRow, NEW_INDIVIDUAL,
};
use crate::fsio;
use anyhow::{Context, Result};
use indicatif::ProgressBar;
use rand::distributions::WeightedIndex;
use rand::prelude::*;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use render::{Individual, SPECIES, SPECIES_WEIGHTS};
use std::collections::{HashMap, HashSet};
use std::io::Write;

/// Photos per individual in the real Happywhale `train.csv`: (photos, individuals).
/// 9,258 of its 15,587 individuals are seen once, one is seen 400 times.
#[rustfmt::skip]
const REAL_PHOTOS_PER_INDIVIDUAL: &[(usize, usize)] = &[
    (1, 9258), (2, 3091), (3, 773), (4, 741), (5, 374), (6, 135), (7, 108), (8, 158), (9, 111),
    (10, 43), (11, 89), (12, 79), (13, 29), (14, 51), (15, 42), (16, 17), (17, 32), (18, 25),
    (19, 19), (20, 21), (21, 23), (22, 12), (23, 17), (24, 23), (25, 6), (26, 18), (27, 16),
    (28, 8), (29, 12), (30, 12), (31, 7), (32, 9), (33, 8), (34, 3), (35, 9), (36, 7), (37, 7),
    (38, 12), (39, 8), (40, 8), (41, 4), (42, 7), (43, 5), (44, 8), (45, 8), (46, 5), (47, 2),
    (48, 9), (49, 4), (50, 4), (51, 5), (53, 4), (54, 5), (55, 5), (56, 3), (57, 4), (58, 3),
    (59, 1), (60, 3), (61, 1), (63, 4), (64, 2), (65, 3), (67, 1), (68, 3), (69, 1), (70, 4),
    (71, 1), (72, 1), (73, 1), (74, 2), (75, 4), (77, 2), (79, 2), (80, 3), (81, 2), (82, 1),
    (84, 1), (86, 1), (87, 1), (88, 1), (89, 1), (90, 2), (93, 1), (94, 1), (98, 1), (99, 2),
    (103, 1), (108, 1), (111, 1), (112, 1), (119, 1), (121, 1), (122, 3), (126, 1), (129, 1),
    (131, 2), (135, 2), (140, 1), (141, 2), (143, 1), (145, 2), (146, 1), (153, 1), (154, 1),
    (155, 1), (168, 1), (400, 1),
];

/// What to generate.
#[derive(Clone, Debug, clap::Args)]
pub struct SynthConfig {
    /// Individuals rendered.
    #[arg(long, default_value_t = 200)]
    pub individuals: usize,
    /// Seeds every draw: same arguments and seed, same bytes.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Photo width in pixels.
    #[arg(long, default_value_t = 384)]
    pub width: u32,
    /// Photo height in pixels.
    #[arg(long, default_value_t = 256)]
    pub height: u32,
    /// Share of individuals seen only in the test images (their truth is `new_individual`).
    #[arg(long, default_value_t = 0.15)]
    pub new_share: f64,
    /// Share of a known individual's photos, beyond its first, held out as test images.
    #[arg(long, default_value_t = 0.3)]
    pub test_share: f64,
    /// Most photos of one individual (drawn from the real distribution, capped here).
    #[arg(long, default_value_t = 60)]
    pub max_photos: usize,
    /// JPEG quality of the written photos.
    #[arg(long, default_value_t = 90)]
    pub quality: u8,
}

impl Default for SynthConfig {
    fn default() -> Self {
        crate::args::defaults_of()
    }
}

/// `finprint synth`.
#[derive(Clone, Debug, clap::Args)]
pub struct SynthArgs {
    /// The catalogue folder to write (Kaggle's layout).
    #[arg(long)]
    pub out: std::path::PathBuf,
    #[command(flatten)]
    pub config: SynthConfig,
}

/// `finprint synth`: the catalogue written to `args.out`.
pub fn run(args: &SynthArgs, progress: &ProgressBar) -> Result<SynthSummary> {
    generate(&KaggleDir::new(&args.out), &args.config, progress)
}

impl std::fmt::Display for SynthSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} individuals ({} only in test), {} train and {} test photos",
            self.individuals, self.new_individuals, self.train_images, self.test_images
        )
    }
}

/// What was generated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SynthSummary {
    pub individuals: usize,
    pub new_individuals: usize,
    pub train_images: usize,
    pub test_images: usize,
}

/// One photo to render.
struct Shot {
    image: String,
    individual: usize,
    seed: u64,
    test: bool,
}

/// `n` lowercase hex digits.
fn hex_id(rng: &mut impl Rng, n: usize) -> String {
    (0..n)
        .map(|_| char::from_digit(rng.gen_range(0..16), 16).unwrap_or('0'))
        .collect()
}

/// Draw ids of `n` hex digits, never the same one twice.
fn unique_hex(rng: &mut impl Rng, n: usize, taken: &mut HashSet<String>) -> String {
    loop {
        let id = hex_id(rng, n);
        if taken.insert(id.clone()) {
            return id;
        }
    }
}

/// A box in the community format: `[[x0 y0 x1 y1]]` in whole pixels.
fn community_bbox(b: &BoxPx) -> String {
    format!(
        "[[{} {} {} {}]]",
        b.x0.floor() as i64,
        b.y0.floor() as i64,
        b.x1.ceil() as i64,
        b.y1.ceil() as i64
    )
}

/// Generate a complete Kaggle-format dataset in `out`: `train.csv`, `train_images/`,
/// `test_images/`, `sample_submission.csv`, `test_solution.csv`, `fin_boxes.csv` (true dorsal
/// fin boxes, community format) and `body_boxes.csv` (fin and visible back).
pub fn generate(
    out: &KaggleDir,
    cfg: &SynthConfig,
    progress: &ProgressBar,
) -> Result<SynthSummary> {
    anyhow::ensure!(cfg.individuals > 0, "--individuals must be at least 1");
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let species_dist = WeightedIndex::new(SPECIES_WEIGHTS).context("species weights")?;
    let counts_dist = WeightedIndex::new(REAL_PHOTOS_PER_INDIVIDUAL.iter().map(|&(_, n)| n))
        .context("photo count weights")?;

    let mut taken = HashSet::new();
    let mut animals = Vec::with_capacity(cfg.individuals);
    let mut shots = Vec::new();
    let new_count = (cfg.new_share.clamp(0.0, 1.0) * cfg.individuals as f64).round() as usize;
    for i in 0..cfg.individuals {
        let id = unique_hex(&mut rng, 12, &mut taken);
        let ind = Individual::sample(species_dist.sample(&mut rng), &mut rng);
        let photos = REAL_PHOTOS_PER_INDIVIDUAL[counts_dist.sample(&mut rng)]
            .0
            .min(cfg.max_photos.max(1));
        // The first individuals drawn are the new ones: which ones is random through their marks.
        let is_new = i < new_count;
        for p in 0..photos {
            let test = is_new || (p > 0 && rng.gen_bool(cfg.test_share.clamp(0.0, 1.0)));
            shots.push(Shot {
                image: format!("{}.jpg", unique_hex(&mut rng, 14, &mut taken)),
                individual: i,
                seed: rng.gen(),
                test,
            });
        }
        animals.push((id, ind, is_new));
    }
    shots.shuffle(&mut rng);

    let dirs = [out.train_images(), out.test_images()];
    for d in &dirs {
        std::fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
    }
    progress.set_length(shots.len() as u64);
    let boxes: Vec<(BoxPx, BoxPx)> = shots
        .par_iter()
        .map(|shot| -> Result<(BoxPx, BoxPx)> {
            let mut rng = ChaCha8Rng::seed_from_u64(shot.seed);
            let photo =
                render::render(&animals[shot.individual].1, cfg.width, cfg.height, &mut rng);
            let mut bytes = Vec::new();
            image::codecs::jpeg::JpegEncoder::new_with_quality(&mut bytes, cfg.quality)
                .encode_image(&photo.image)
                .context("encoding JPEG")?;
            let path = dirs[usize::from(shot.test)].join(&shot.image);
            fsio::write_bytes_atomic(&path, &bytes)?;
            progress.inc(1);
            Ok((photo.fin_box, photo.body_box))
        })
        .collect::<Result<_>>()?;

    let label = |s: &Shot| {
        let (id, ind, _) = &animals[s.individual];
        (id.as_str(), SPECIES[ind.species])
    };
    let train: Vec<TrainRow> = shots
        .iter()
        .filter(|s| !s.test)
        .map(|s| TrainRow {
            image: s.image.clone(),
            species: label(s).1.to_string(),
            individual_id: label(s).0.to_string(),
            encounter: None,
        })
        .collect();
    write_train_csv(&out.train_csv(), &train)?;

    let test: Vec<&Shot> = shots.iter().filter(|s| s.test).collect();
    let solution: Vec<SolutionRow> = test
        .iter()
        .map(|s| SolutionRow {
            image: s.image.clone(),
            individual_id: if animals[s.individual].2 {
                NEW_INDIVIDUAL.to_string()
            } else {
                label(s).0.to_string()
            },
        })
        .collect();
    write_solution(&out.test_solution(), &solution)?;

    // Kaggle's sample submission: the most photographed individuals, then new_individual.
    let mut train_counts: HashMap<&str, usize> = HashMap::new();
    train
        .iter()
        .for_each(|r| *train_counts.entry(&r.individual_id).or_default() += 1);
    let mut popular: Vec<(&str, usize)> = train_counts.into_iter().collect();
    popular.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    let mut sample_ids: Vec<String> = popular.iter().take(4).map(|p| p.0.to_string()).collect();
    sample_ids.push(NEW_INDIVIDUAL.to_string());
    let sample: Vec<Prediction> = test
        .iter()
        .map(|s| Prediction {
            image: s.image.clone(),
            ids: sample_ids.clone(),
        })
        .collect();
    write_submission(&out.sample_submission(), &sample)?;

    fsio::write_atomic(&out.fin_boxes(), |w| {
        writeln!(w, "image,bbox,conf")?;
        for (s, (fin, _)) in shots.iter().zip(&boxes) {
            writeln!(w, "{},{},[1.0000]", s.image, community_bbox(fin))?;
        }
        Ok(())
    })?;
    fsio::write_atomic(&out.root.join("body_boxes.csv"), |w| {
        writeln!(w, "image,box")?;
        for (s, (_, body)) in shots.iter().zip(&boxes) {
            let b = community_bbox(body);
            writeln!(w, "{},{}", s.image, b.trim_matches(['[', ']']))?;
        }
        Ok(())
    })?;

    Ok(SynthSummary {
        individuals: cfg.individuals,
        new_individuals: new_count,
        train_images: train.len(),
        test_images: test.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{read_solution, read_submission, read_train_csv};

    fn small(seed: u64) -> SynthConfig {
        SynthConfig {
            individuals: 12,
            seed,
            width: 96,
            height: 64,
            ..SynthConfig::default()
        }
    }

    fn files(dir: &std::path::Path) -> Vec<(String, Vec<u8>)> {
        let mut out = Vec::new();
        for sub in ["", "train_images", "test_images"] {
            let d = dir.join(sub);
            let mut names: Vec<_> = std::fs::read_dir(&d)
                .unwrap()
                .map(|e| e.unwrap().path())
                .filter(|p| p.is_file())
                .collect();
            names.sort();
            for p in names {
                out.push((
                    p.strip_prefix(dir).unwrap().display().to_string(),
                    std::fs::read(&p).unwrap(),
                ));
            }
        }
        out
    }

    #[test]
    fn same_seed_same_bytes() {
        let (a, b, c) = (
            tempfile::tempdir().unwrap(),
            tempfile::tempdir().unwrap(),
            tempfile::tempdir().unwrap(),
        );
        let bar = ProgressBar::hidden();
        generate(&KaggleDir::new(a.path()), &small(5), &bar).unwrap();
        generate(&KaggleDir::new(b.path()), &small(5), &bar).unwrap();
        generate(&KaggleDir::new(c.path()), &small(6), &bar).unwrap();
        assert_eq!(files(a.path()), files(b.path()));
        assert_ne!(files(a.path()), files(c.path()));
    }

    #[test]
    fn the_dataset_is_complete_and_consistent() {
        let dir = tempfile::tempdir().unwrap();
        let kaggle = KaggleDir::new(dir.path());
        let cfg = SynthConfig {
            individuals: 40,
            new_share: 0.25,
            ..small(1)
        };
        let summary = generate(&kaggle, &cfg, &ProgressBar::hidden()).unwrap();
        assert_eq!(summary.new_individuals, 10);

        let train = read_train_csv(&kaggle.train_csv()).unwrap();
        let solution = read_solution(&kaggle.test_solution()).unwrap();
        let sample = read_submission(&kaggle.sample_submission()).unwrap();
        assert_eq!(train.rows.len(), summary.train_images);
        assert_eq!(solution.len(), summary.test_images);
        assert_eq!(sample.len(), solution.len());
        for r in &train.rows {
            assert!(kaggle.train_images().join(&r.image).is_file());
            assert!(SPECIES.contains(&r.species.as_str()));
        }
        let known: HashSet<&str> = train
            .rows
            .iter()
            .map(|r| r.individual_id.as_str())
            .collect();
        assert_eq!(
            known.len(),
            30,
            "every known individual has a training photo"
        );
        for s in &solution {
            assert!(kaggle.test_images().join(&s.image).is_file());
            assert!(s.individual_id == NEW_INDIVIDUAL || known.contains(s.individual_id.as_str()));
        }
        assert!(solution.iter().any(|s| s.individual_id == NEW_INDIVIDUAL));
        assert!(solution.iter().any(|s| s.individual_id != NEW_INDIVIDUAL));

        let boxes = crate::data::CsvFile::read(&kaggle.fin_boxes()).unwrap();
        assert_eq!(boxes.len(), summary.train_images + summary.test_images);
        let bbox = boxes.column("bbox").unwrap();
        for row in boxes.rows() {
            let text = row.field(bbox).unwrap();
            let v: Vec<i64> = text
                .trim_matches(['[', ']'])
                .split(' ')
                .map(|x| x.parse().unwrap())
                .collect();
            assert!(
                v[0] < v[2] && v[1] < v[3] && v[2] <= 96 && v[3] <= 64,
                "{text}"
            );
        }
    }

    #[test]
    fn photos_per_individual_follow_the_long_tail() {
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let dist = WeightedIndex::new(REAL_PHOTOS_PER_INDIVIDUAL.iter().map(|&(_, n)| n)).unwrap();
        let draws: Vec<usize> = (0..20_000)
            .map(|_| REAL_PHOTOS_PER_INDIVIDUAL[dist.sample(&mut rng)].0)
            .collect();
        let singles = draws.iter().filter(|&&n| n == 1).count() as f64 / draws.len() as f64;
        // 9,258 of 15,587 real individuals are singletons: 59.4%.
        assert!((singles - 0.594).abs() < 0.015, "{singles}");
        assert!(draws.iter().any(|&n| n >= 50));
        let total: usize = REAL_PHOTOS_PER_INDIVIDUAL.iter().map(|&(_, n)| n).sum();
        let photos: usize = REAL_PHOTOS_PER_INDIVIDUAL.iter().map(|&(p, n)| p * n).sum();
        assert_eq!(
            (total, photos),
            (15_587, 51_033),
            "the table is the real train.csv"
        );
    }
}
