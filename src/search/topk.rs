//! Bounded selection of the best `k` neighbours.

use super::Neighbor;
use std::cmp::Ordering;
use std::collections::BinaryHeap;

/// A neighbour ordered so that the worse of two compares greater, putting the worst kept
/// neighbour at the top of a [`BinaryHeap`].
#[derive(Clone, Copy)]
struct Worse(Neighbor);

impl Ord for Worse {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0.rank_cmp(&other.0)
    }
}

impl PartialOrd for Worse {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Worse {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Worse {}

/// The best `k` neighbours pushed so far.
#[derive(Clone)]
pub(crate) struct TopK {
    k: usize,
    heap: BinaryHeap<Worse>,
    /// The worst kept score once `k` are kept, else −∞: anything lower cannot enter.
    floor: f32,
}

impl TopK {
    pub(crate) fn new(k: usize) -> Self {
        Self {
            k,
            heap: BinaryHeap::with_capacity(k.min(1024)),
            floor: f32::NEG_INFINITY,
        }
    }

    /// Whether `k` neighbours are kept.
    pub(crate) fn is_full(&self) -> bool {
        self.heap.len() >= self.k
    }

    /// The worst kept score when full, else −∞.
    pub(crate) fn floor(&self) -> f32 {
        self.floor
    }

    #[inline]
    pub(crate) fn push(&mut self, candidate: Neighbor) {
        if candidate.score < self.floor {
            return;
        }
        if self.heap.len() < self.k {
            self.heap.push(Worse(candidate));
        } else if let Some(mut worst) = self.heap.peek_mut() {
            if candidate.rank_cmp(&worst.0) == Ordering::Less {
                *worst = Worse(candidate);
            } else {
                return;
            }
        }
        if self.is_full() {
            if let Some(worst) = self.heap.peek() {
                self.floor = worst.0.score;
            }
        }
    }

    pub(crate) fn merge(&mut self, other: TopK) {
        for w in other.heap {
            self.push(w.0);
        }
    }

    /// The kept neighbours, best first.
    pub(crate) fn into_sorted(self) -> Vec<Neighbor> {
        self.heap
            .into_sorted_vec()
            .into_iter()
            .map(|w| w.0)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_best_k_with_lower_id_first_on_ties() {
        let mut top = TopK::new(3);
        for (id, score) in [(5, 0.5), (1, 0.9), (4, 0.5), (2, 0.1), (3, 0.5), (0, 0.2)] {
            top.push(Neighbor { id, score });
        }
        let ids: Vec<u32> = top.into_sorted().iter().map(|n| n.id).collect();
        assert_eq!(ids, vec![1, 3, 4]);
    }

    #[test]
    fn zero_k_keeps_nothing() {
        let mut top = TopK::new(0);
        top.push(Neighbor { id: 0, score: 1.0 });
        assert!(top.into_sorted().is_empty());
    }
}
