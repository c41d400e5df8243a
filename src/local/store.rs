//! Local features stored once: each photo's keypoints and descriptors as bytes (a catalogue
//! keeps them per photo), and a features file of many photos beside the embeddings, tagged
//! with how they were extracted so that features of other settings are never matched.

use super::Features;
use anyhow::{bail, ensure, Context, Result};
use half::f16;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;

/// The settings that decide a photo's features.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Extraction {
    pub method: String,
    pub size: u32,
    pub keypoints: usize,
    pub contrast: f32,
    pub region: [f32; 4],
    /// Features stored before regions had shapes were all extracted in a box.
    #[serde(default)]
    pub shape: crate::local::Shape,
    /// CLAHE's clip limit before SIFT (0: none). Left out of the JSON when 0, so that features
    /// stored before it keep their tag.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub clahe: f32,
}

fn is_zero(v: &f32) -> bool {
    *v == 0.0
}

const HEADER: usize = 16;
/// The header of features stored before their descriptor length was, all 128-d RootSIFT: no
/// length word.
const HEADER_128: usize = 12;

/// Bytes per keypoint: its position (two f32) and its descriptor of `dim` f16.
pub fn keypoint_bytes(dim: usize) -> usize {
    8 + 2 * dim
}

impl Features {
    /// Little-endian: width, height, count and descriptor length (u32), the points (f32
    /// pairs), the descriptors (f16, which is how they are extracted: see `Matcher::extract`).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER + self.len() * keypoint_bytes(self.dim));
        for v in [
            self.size[0],
            self.size[1],
            self.len() as u32,
            self.dim as u32,
        ] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        for v in self.points.iter().flatten() {
            out.extend_from_slice(&v.to_le_bytes());
        }
        for &v in &self.descriptors {
            out.extend_from_slice(&f16::from_f32(v).to_le_bytes());
        }
        out
    }

    /// The features of [`Features::to_bytes`], or of the earlier 128-d layout without the
    /// length word.
    pub fn from_bytes(bytes: &[u8]) -> Result<Features> {
        ensure!(
            bytes.len() >= HEADER_128,
            "local features: {} bytes, no header",
            bytes.len()
        );
        let word = |i: usize| u32::from_le_bytes(bytes[4 * i..4 * i + 4].try_into().unwrap());
        let (size, n) = ([word(0), word(1)], word(2) as usize);
        let fits = |header: usize, dim: usize| {
            let body = n.checked_mul(keypoint_bytes(dim));
            body.and_then(|b| b.checked_add(header)) == Some(bytes.len())
        };
        let (header, dim) = match bytes.len() >= HEADER {
            true if fits(HEADER, word(3) as usize) => (HEADER, word(3) as usize),
            _ if fits(HEADER_128, 128) => (HEADER_128, 128),
            _ => bail!("local features: {} bytes for {n} keypoints", bytes.len()),
        };
        let (points, descriptors) = bytes[header..].split_at(n * 8);
        let floats: Vec<f32> = points
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        Ok(Features {
            size,
            points: floats.chunks_exact(2).map(|p| [p[0], p[1]]).collect(),
            dim,
            descriptors: descriptors
                .chunks_exact(2)
                .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
        })
    }
}

/// The local features of many photos, extracted one way. A features file holds one such group
/// per extraction (safetensors: group `k` is a `u8` tensor of every photo's bytes and an `i64`
/// tensor of offsets, `features`/`offsets` for the first and `features.k`/`offsets.k` for the
/// others; names and extraction in the metadata under the same suffix).
#[derive(Clone, Debug, PartialEq)]
pub struct FeatureFile {
    pub extraction: Extraction,
    pub names: Vec<String>,
    pub features: Vec<Features>,
}

/// The suffix of group `k`'s tensor and metadata names.
fn suffix(k: usize) -> String {
    match k {
        0 => String::new(),
        k => format!(".{k}"),
    }
}

impl FeatureFile {
    /// Write `groups` to `path` (atomically).
    pub fn save_all(groups: &[FeatureFile], path: &Path) -> Result<()> {
        let mut blobs = Vec::new();
        let mut metadata = HashMap::new();
        for (k, g) in groups.iter().enumerate() {
            let mut blob = Vec::new();
            let mut offsets = vec![0i64];
            for f in &g.features {
                blob.extend(f.to_bytes());
                offsets.push(blob.len() as i64);
            }
            let offsets: Vec<u8> = offsets.iter().flat_map(|o| o.to_le_bytes()).collect();
            blobs.push((k, blob, offsets));
            let s = suffix(k);
            metadata.insert(format!("names{s}"), serde_json::to_string(&g.names)?);
            metadata.insert(
                format!("extraction{s}"),
                serde_json::to_string(&g.extraction)?,
            );
        }
        let view = |dtype, shape, data| {
            safetensors::tensor::TensorView::new(dtype, shape, data).context("features tensor")
        };
        let mut tensors = Vec::new();
        for (k, blob, offsets) in &blobs {
            let s = suffix(*k);
            let n = offsets.len() / 8;
            tensors.push((
                format!("features{s}"),
                view(safetensors::Dtype::U8, vec![blob.len()], blob)?,
            ));
            tensors.push((
                format!("offsets{s}"),
                view(safetensors::Dtype::I64, vec![n], offsets)?,
            ));
        }
        let data =
            safetensors::serialize(tensors, &Some(metadata)).context("serialising features")?;
        crate::fsio::write_bytes_atomic(path, &data)
    }

    /// Every group of the features file `path`.
    pub fn load_all(path: &Path) -> Result<Vec<FeatureFile>> {
        let bytes =
            std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        let bad = |what: &str| {
            anyhow::anyhow!(
                "{}: not a finprint local features file ({what})",
                path.display()
            )
        };
        let (_, meta) =
            safetensors::SafeTensors::read_metadata(&bytes).map_err(|_| bad("header"))?;
        let field = |key: &str| meta.metadata().as_ref().and_then(|m| m.get(key)).cloned();
        let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|_| bad("tensors"))?;
        let mut groups = Vec::new();
        for k in 0.. {
            let s = suffix(k);
            let Some(names) = field(&format!("names{s}")) else {
                break;
            };
            let names: Vec<String> = serde_json::from_str(&names).map_err(|_| bad("names"))?;
            let extraction: Extraction = field(&format!("extraction{s}"))
                .and_then(|n| serde_json::from_str(&n).ok())
                .ok_or_else(|| bad("no extraction settings"))?;
            let blob = st
                .tensor(&format!("features{s}"))
                .map_err(|_| bad("no 'features'"))?;
            let offsets: Vec<usize> = st
                .tensor(&format!("offsets{s}"))
                .map_err(|_| bad("no 'offsets'"))?
                .data()
                .chunks_exact(8)
                .map(|b| i64::from_le_bytes(b.try_into().unwrap()) as usize)
                .collect();
            if offsets.len() != names.len() + 1
                || offsets.windows(2).any(|w| w[0] > w[1])
                || offsets.last() != Some(&blob.data().len())
            {
                bail!(bad("offsets"));
            }
            let features = offsets
                .windows(2)
                .zip(&names)
                .map(|(w, name)| {
                    Features::from_bytes(&blob.data()[w[0]..w[1]])
                        .with_context(|| format!("{}: photo {name}", path.display()))
                })
                .collect::<Result<_>>()?;
            groups.push(FeatureFile {
                extraction,
                names,
                features,
            });
        }
        anyhow::ensure!(!groups.is_empty(), bad("no names"));
        Ok(groups)
    }
}

/// The features of `names`: read from `file` where it holds them, extracted the same way;
/// the others by `extract` (in parallel), after which the file is rewritten with all of them.
/// Features the file holds of other extractions stay in it. Returns the features and how
/// many were extracted.
pub fn cached(
    file: Option<&Path>,
    extraction: &Extraction,
    names: &[String],
    extract: impl Fn(usize) -> Result<Features> + Sync,
) -> Result<(Vec<Features>, usize)> {
    let mut groups = match file.filter(|p| p.exists()) {
        Some(path) => FeatureFile::load_all(path)?,
        None => Vec::new(),
    };
    let mut stored: HashMap<String, Features> =
        match groups.iter().position(|g| &g.extraction == extraction) {
            Some(k) => {
                let g = groups.remove(k);
                g.names.into_iter().zip(g.features).collect()
            }
            None => HashMap::new(),
        };
    let fresh: Vec<(usize, Features)> = (0..names.len())
        .into_par_iter()
        .filter(|&i| !stored.contains_key(&names[i]))
        .map(|i| Ok((i, extract(i)?)))
        .collect::<Result<_>>()?;
    let extracted = fresh.len();
    let mut fresh: HashMap<usize, Features> = fresh.into_iter().collect();
    let features: Vec<Features> = names
        .iter()
        .enumerate()
        .map(|(i, name)| match fresh.remove(&i) {
            Some(f) => f,
            None => stored[name].clone(),
        })
        .collect();
    if let (Some(path), true) = (file, extracted > 0) {
        for (name, f) in names.iter().zip(&features) {
            stored.insert(name.clone(), f.clone());
        }
        let (names, features) = stored.into_iter().unzip();
        groups.push(FeatureFile {
            extraction: extraction.clone(),
            names,
            features,
        });
        FeatureFile::save_all(&groups, path)?;
    }
    Ok((features, extracted))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(n: usize, seed: f32) -> Features {
        sample_of(n, seed, 128)
    }

    fn sample_of(n: usize, seed: f32, dim: usize) -> Features {
        Features {
            size: [256, 81],
            points: (0..n).map(|i| [i as f32 + 0.25, seed]).collect(),
            dim,
            // Halves are exact in f16.
            descriptors: (0..n * dim).map(|i| (i % 7) as f32 * 0.5 + seed).collect(),
        }
    }

    fn extraction() -> Extraction {
        Extraction {
            method: "rootsift".into(),
            size: 256,
            keypoints: 1000,
            contrast: 0.04,
            region: [0.0, 0.0, 1.0, 1.0],
            shape: crate::local::Shape::Box,
            clahe: 0.0,
        }
    }

    #[test]
    fn a_photo_round_trips_through_bytes_and_bad_lengths_are_refused() {
        let f = sample(3, 1.0);
        let bytes = f.to_bytes();
        assert_eq!(bytes.len(), 16 + 3 * (8 + 256));
        assert_eq!(Features::from_bytes(&bytes).unwrap(), f);
        assert!(Features::from_bytes(&bytes[..bytes.len() - 1]).is_err());
        assert!(Features::from_bytes(&bytes[..5]).is_err());
        assert_eq!(
            Features::from_bytes(&Features::default().to_bytes()).unwrap(),
            Features::default()
        );
    }

    #[test]
    fn descriptors_of_any_length_round_trip_and_the_length_is_checked() {
        let f = sample_of(5, 0.5, 64);
        let bytes = f.to_bytes();
        assert_eq!(bytes.len(), 16 + 5 * (8 + 128));
        assert_eq!(Features::from_bytes(&bytes).unwrap(), f);
        let mut wrong = bytes.clone();
        wrong[12..16].copy_from_slice(&65u32.to_le_bytes());
        assert!(Features::from_bytes(&wrong).is_err());
    }

    #[test]
    fn features_stored_before_the_length_word_read_as_128_d() {
        let f = sample(2, 1.5);
        let bytes = f.to_bytes();
        let legacy: Vec<u8> = [&bytes[..12], &bytes[16..]].concat();
        assert_eq!(Features::from_bytes(&legacy).unwrap(), f);
        assert!(Features::from_bytes(&legacy[..legacy.len() - 2]).is_err());
    }

    #[test]
    fn the_file_caches_what_was_extracted_and_extracts_only_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("local.safetensors");
        let names: Vec<String> = ["a.jpg", "b.jpg"].map(String::from).to_vec();
        let calls = std::sync::atomic::AtomicUsize::new(0);
        let extract = |i: usize| {
            calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Ok(sample(i + 1, i as f32))
        };
        let (first, n) = cached(Some(&path), &extraction(), &names, extract).unwrap();
        assert_eq!((n, first[1].len()), (2, 2));
        let more: Vec<String> = ["b.jpg", "c.jpg", "a.jpg"].map(String::from).to_vec();
        let (second, n) = cached(Some(&path), &extraction(), &more, extract).unwrap();
        assert_eq!(n, 1, "only c.jpg is new");
        assert_eq!((&second[0], &second[2]), (&first[1], &first[0]));
        assert_eq!(FeatureFile::load_all(&path).unwrap()[0].names.len(), 3);
        let other = Extraction {
            size: 512,
            ..extraction()
        };
        let (_, n) = cached(Some(&path), &other, &names, extract).unwrap();
        assert_eq!(n, 2, "other settings: extracted again");
        // Both extractions stay in the file: neither is extracted again.
        let groups = FeatureFile::load_all(&path).unwrap();
        assert_eq!(groups.len(), 2);
        let (again, n) = cached(Some(&path), &extraction(), &more, extract).unwrap();
        assert_eq!((n, again), (0, second));
        assert_eq!(cached(Some(&path), &other, &names, extract).unwrap().1, 0);
        assert_eq!(calls.into_inner(), 5);
    }

    /// Features stored before CLAHE keep their tag (catalogues and features files match on
    /// it); with CLAHE the tag differs and says so.
    #[test]
    fn the_tag_without_clahe_is_the_tag_from_before_it() {
        let before = r#"{"method":"rootsift","size":256,"keypoints":1000,"contrast":0.04,"region":[0.0,0.0,1.0,1.0],"shape":"box"}"#;
        assert_eq!(serde_json::to_string(&extraction()).unwrap(), before);
        let read: Extraction = serde_json::from_str(before).unwrap();
        assert_eq!(read, extraction());
        let equalised = Extraction {
            clahe: 2.0,
            ..extraction()
        };
        let tag = serde_json::to_string(&equalised).unwrap();
        assert!(tag.ends_with(r#""clahe":2.0}"#), "{tag}");
    }

    #[test]
    fn a_file_that_is_not_features_is_named_in_the_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("junk.safetensors");
        std::fs::write(&path, b"not at all").unwrap();
        let err = format!("{:#}", FeatureFile::load_all(&path).unwrap_err());
        assert!(
            err.contains("junk.safetensors") && err.contains("not a finprint"),
            "{err}"
        );
    }
}
