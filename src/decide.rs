//! The decision for one query: its candidate individuals, best first, and where
//! `new_individual` goes among them (at a threshold on the scores), with the threshold chosen
//! on validation queries or for a share of new predictions.

use crate::data::NEW_INDIVIDUAL;
use crate::metrics::{average_precision_at_5, K};

/// One candidate individual for a query, with its similarity (higher is more alike).
#[derive(Clone, Debug, PartialEq)]
pub struct Candidate {
    pub id: String,
    pub score: f32,
}

/// The five answers for a query whose candidates are sorted best first: `new_individual` takes
/// the place where the similarity falls below `threshold` (first, when even the best is below).
pub fn answers(candidates: &[Candidate], threshold: f32) -> Vec<String> {
    let mut out = Vec::with_capacity(K);
    let mut new_placed = false;
    for c in candidates {
        if out.len() == K {
            break;
        }
        if !new_placed && c.score < threshold {
            out.push(NEW_INDIVIDUAL.to_string());
            new_placed = true;
            if out.len() == K {
                break;
            }
        }
        if c.id != NEW_INDIVIDUAL {
            out.push(c.id.clone());
        }
    }
    if !new_placed && out.len() < K {
        out.push(NEW_INDIVIDUAL.to_string());
    }
    out
}

/// The threshold that maximises MAP@5 over validation queries (candidates, true id), among the
/// candidates' own scores and the values just above them (the only places where the answers
/// change: the lowest score never puts new_individual before a candidate, just above the
/// highest always does); ties go to the lowest threshold. Always finite, so it saves to JSON.
/// Returns (threshold, MAP@5).
pub fn best_threshold(queries: &[(Vec<Candidate>, String)]) -> (f32, f64) {
    if queries.is_empty() {
        return (0.0, 0.0);
    }
    let mut grid: Vec<f32> = queries
        .iter()
        .flat_map(|(c, _)| c.iter().take(K).map(|c| c.score))
        .filter(|s| s.is_finite())
        .chain([0.0])
        .collect();
    // A threshold just above a score puts new_individual before that candidate.
    let above: Vec<f32> = grid.iter().map(|s| s.next_up()).collect();
    grid.extend(above);
    grid.sort_by(f32::total_cmp);
    grid.dedup();
    let map_at = |t: f32| {
        queries
            .iter()
            .map(|(c, truth)| average_precision_at_5(truth, &answers(c, t)))
            .sum::<f64>()
            / queries.len() as f64
    };
    grid.into_iter()
        .map(|t| (t, map_at(t)))
        .fold((f32::NEG_INFINITY, -1.0), |best, x| {
            if x.1 > best.1 {
                x
            } else {
                best
            }
        })
}

/// The threshold under which a `share` of the queries' best scores fall: the winners' fixed
/// share of `new_individual` first.
pub fn threshold_for_new_share(best_scores: &[f32], share: f64) -> f32 {
    if best_scores.is_empty() {
        return 0.0;
    }
    let mut s = best_scores.to_vec();
    s.sort_by(f32::total_cmp);
    let n = ((share.clamp(0.0, 1.0) * s.len() as f64).round() as usize).min(s.len());
    if n == 0 {
        f32::NEG_INFINITY
    } else if n == s.len() {
        f32::INFINITY
    } else {
        // Between the n-th and (n+1)-th lowest best score.
        (s[n - 1] + s[n]) / 2.0
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn candidates(list: &[(&str, f32)]) -> Vec<Candidate> {
        list.iter()
            .map(|&(id, score)| Candidate {
                id: id.into(),
                score,
            })
            .collect()
    }

    #[test]
    fn new_individual_takes_the_place_where_similarity_drops() {
        let c = candidates(&[
            ("a", 0.9),
            ("b", 0.6),
            ("c", 0.5),
            ("d", 0.4),
            ("e", 0.3),
            ("f", 0.2),
        ]);
        assert_eq!(answers(&c, 0.55), ["a", "b", "new_individual", "c", "d"]);
        assert_eq!(answers(&c, 0.95), ["new_individual", "a", "b", "c", "d"]);
        assert_eq!(answers(&c, 0.1), ["a", "b", "c", "d", "e"]);
        // Fewer than five candidates: new_individual closes the list.
        assert_eq!(answers(&c[..2], 0.1), ["a", "b", "new_individual"]);
        assert_eq!(answers(&[], 0.5), ["new_individual"]);
    }

    #[test]
    fn the_best_threshold_is_found_on_a_hand_made_case() {
        // Query 1 is known (a, 0.8); query 2 is new (best 0.5); query 3 is known (b, 0.55).
        let q = vec![
            (candidates(&[("a", 0.8), ("x", 0.3)]), "a".to_string()),
            (
                candidates(&[("y", 0.5), ("z", 0.2)]),
                NEW_INDIVIDUAL.to_string(),
            ),
            (candidates(&[("b", 0.55), ("w", 0.1)]), "b".to_string()),
        ];
        let (t, map) = best_threshold(&q);
        // Only a threshold in (0.5, 0.55] answers all three right.
        assert!((map - 1.0).abs() < 1e-12, "{map}");
        assert!(t > 0.5 && t <= 0.55, "{t}");
        let check: f64 = q
            .iter()
            .map(|(c, truth)| average_precision_at_5(truth, &answers(c, t)))
            .sum::<f64>()
            / 3.0;
        assert!((check - map).abs() < 1e-12);
    }

    #[test]
    fn the_best_threshold_is_finite_even_when_new_individual_belongs_first_everywhere() {
        let all_new = vec![
            (candidates(&[("a", 0.9)]), NEW_INDIVIDUAL.to_string()),
            (candidates(&[("b", 0.4)]), NEW_INDIVIDUAL.to_string()),
        ];
        let (t, map) = best_threshold(&all_new);
        assert!(t.is_finite() && t > 0.9, "{t}");
        assert!((map - 1.0).abs() < 1e-12);
        let all_known = vec![(candidates(&[("a", -0.3)]), "a".to_string())];
        let (t, map) = best_threshold(&all_known);
        assert!(t.is_finite() && t <= -0.3, "{t}");
        assert!((map - 1.0).abs() < 1e-12);
    }

    #[test]
    fn a_share_of_new_predictions_sets_the_threshold() {
        let best = [0.9, 0.2, 0.5, 0.7];
        let t = threshold_for_new_share(&best, 0.5);
        assert!((t - 0.6).abs() < 1e-6);
        assert_eq!(best.iter().filter(|&&s| s < t).count(), 2);
        assert_eq!(threshold_for_new_share(&best, 0.0), f32::NEG_INFINITY);
    }
}
