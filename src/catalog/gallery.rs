//! The in-memory search index over the confirmed photos of a catalogue.

use super::{alias_map, canonical, PhotoMatch};
use crate::decide::Candidate;
use crate::predict::rank_candidates;
use crate::search::{Aggregation, Index, IndexSpec};
use anyhow::Result;
use rusqlite::Connection;
use std::collections::HashMap;

/// An embedding as stored: little-endian f32s.
pub fn to_blob(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

pub fn from_blob(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// Confirmed photos, each row labelled with the individual it resolves to now.
pub struct Gallery {
    index: Box<dyn Index>,
    dim: usize,
    images: Vec<String>,
    labels: Vec<u32>,
    ids: Vec<String>,
    label_of: HashMap<String, u32>,
}

impl Gallery {
    /// Every confirmed photo with an embedding of `model`, in an index of kind `index`.
    pub fn load(conn: &Connection, model: &str, dim: usize, index: IndexSpec) -> Result<Self> {
        let mut g = Gallery {
            index: index.build(dim),
            dim,
            images: Vec::new(),
            labels: Vec::new(),
            ids: Vec::new(),
            label_of: HashMap::new(),
        };
        let aliases = alias_map(conn)?;
        let mut st = conn.prepare(
            "SELECT p.image, p.individual_id, e.vector FROM photos p
             JOIN embeddings e ON e.image = p.image AND e.model = ?1
             WHERE p.individual_id IS NOT NULL ORDER BY p.image",
        )?;
        let rows = st.query_map([model], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, Vec<u8>>(2)?,
            ))
        })?;
        for row in rows {
            let (image, id, blob) = row?;
            g.add(&image, &canonical(&aliases, &id), &from_blob(&blob))?;
        }
        Ok(g)
    }

    pub fn len(&self) -> usize {
        self.images.len()
    }

    fn label(&mut self, id: &str) -> u32 {
        if let Some(&l) = self.label_of.get(id) {
            return l;
        }
        let l = self.ids.len() as u32;
        self.ids.push(id.to_string());
        self.label_of.insert(id.to_string(), l);
        l
    }

    /// Add photo `image` of individual `id` (as it resolves now).
    pub fn add(&mut self, image: &str, id: &str, v: &[f32]) -> Result<()> {
        anyhow::ensure!(
            v.len() == self.dim,
            "embedding of {image} has {} values, the index {}",
            v.len(),
            self.dim
        );
        self.index.add(v)?;
        self.images.push(image.to_string());
        let label = self.label(id);
        self.labels.push(label);
        Ok(())
    }

    /// The photos of `from` now show `into`.
    pub fn merge(&mut self, from: &str, into: &str) {
        let Some(&old) = self.label_of.get(from) else {
            return;
        };
        let new = self.label(into);
        self.labels
            .iter_mut()
            .filter(|l| **l == old)
            .for_each(|l| *l = new);
    }

    /// The best `top` individuals for a query, each with its `photos_each` photos most like it.
    pub fn rank(
        &self,
        query: &[f32],
        top: usize,
        photos_each: usize,
    ) -> Result<Vec<(Candidate, Vec<PhotoMatch>)>> {
        if self.index.is_empty() {
            return Ok(Vec::new());
        }
        let candidates = rank_candidates(
            self.index.as_ref(),
            &self.labels,
            &self.ids,
            query,
            Aggregation::Max,
            top,
        )?
        .pop()
        .unwrap_or_default();
        Ok(candidates
            .into_iter()
            .map(|c| {
                let photos = self.photos_of(query, &c.id, photos_each);
                (c, photos)
            })
            .collect())
    }

    /// The `n` photos of individual `id` most like the query, best first.
    pub fn photos_of(&self, query: &[f32], id: &str, n: usize) -> Vec<PhotoMatch> {
        let Some(&label) = self.label_of.get(id) else {
            return Vec::new();
        };
        let mut photos: Vec<PhotoMatch> = (0..self.len())
            .filter(|&i| self.labels[i] == label)
            .map(|i| PhotoMatch {
                image: self.images[i].clone(),
                score: self.index.score(query, i).unwrap_or(f32::NAN),
            })
            .collect();
        photos.sort_by(|a, b| b.score.total_cmp(&a.score).then(a.image.cmp(&b.image)));
        photos.truncate(n);
        photos
    }

    /// The `k` photos nearest the query, best first: each with its individual and cosine.
    pub fn nearest(&self, query: &[f32], k: usize) -> Result<Vec<Near>> {
        if self.index.is_empty() {
            return Ok(Vec::new());
        }
        let found = self.index.search(query, k.min(self.len()))?;
        Ok(found
            .into_iter()
            .flatten()
            .map(|nb| {
                let row = nb.id as usize;
                Near {
                    image: self.images[row].clone(),
                    id: self.ids[self.labels[row] as usize].clone(),
                    cosine: nb.score,
                }
            })
            .collect())
    }
}

/// A photo of the index near a query.
#[derive(Clone, Debug, PartialEq)]
pub struct Near {
    pub image: String,
    /// Its individual, as it resolves now.
    pub id: String,
    pub cosine: f32,
}
