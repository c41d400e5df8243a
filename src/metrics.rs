//! MAP@5 as Kaggle's Happywhale competition scores a submission.

use crate::data::{read_solution, read_submission, Prediction, SolutionRow};
use anyhow::Context;
use std::collections::HashMap;
use std::path::PathBuf;

/// `finprint score`.
#[derive(Clone, Debug, clap::Args)]
pub struct ScoreArgs {
    /// The truth: image,individual_id.
    #[arg(long)]
    pub solution: PathBuf,
    /// The submission: image,predictions (5 space-separated ids).
    #[arg(long)]
    pub submission: PathBuf,
}

/// MAP@5 of the submission file against the solution file.
pub fn score(args: &ScoreArgs) -> anyhow::Result<f64> {
    let solution = read_solution(&args.solution)?;
    let predictions = read_submission(&args.submission)?;
    map_at_5(&solution, &predictions).with_context(|| {
        format!(
            "scoring {} against {}",
            args.submission.display(),
            args.solution.display()
        )
    })
}

/// How many ranked ids of a prediction count.
pub const K: usize = 5;

/// The precision at the rank of the first correct id among the first five: 1, 1/2, … 1/5, or 0.
/// Later repeats of an id earn nothing; `new_individual` is an id like any other.
pub fn average_precision_at_5<S: AsRef<str>>(truth: &str, predicted: &[S]) -> f64 {
    predicted
        .iter()
        .take(K)
        .position(|p| p.as_ref() == truth)
        .map_or(0.0, |rank| 1.0 / (rank + 1) as f64)
}

/// An error in pairing a submission with its solution.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ScoreError {
    #[error("the submission has no row for image '{0}' of the solution")]
    MissingRow(String),
    #[error("the submission has a row for image '{0}', which the solution does not have")]
    UnknownImage(String),
    #[error("the solution is empty")]
    Empty,
}

/// Mean average precision at 5 of `submission` against `solution`: every solution image must
/// have exactly one submission row, and every submission row a solution image.
pub fn map_at_5(solution: &[SolutionRow], submission: &[Prediction]) -> Result<f64, ScoreError> {
    if solution.is_empty() {
        return Err(ScoreError::Empty);
    }
    let by_image: HashMap<&str, &Prediction> =
        submission.iter().map(|p| (p.image.as_str(), p)).collect();
    let truth: HashMap<&str, ()> = solution.iter().map(|s| (s.image.as_str(), ())).collect();
    if let Some(extra) = submission
        .iter()
        .find(|p| !truth.contains_key(p.image.as_str()))
    {
        return Err(ScoreError::UnknownImage(extra.image.clone()));
    }
    let mut total = 0.0;
    for s in solution {
        let p = by_image
            .get(s.image.as_str())
            .ok_or_else(|| ScoreError::MissingRow(s.image.clone()))?;
        total += average_precision_at_5(&s.individual_id, &p.ids);
    }
    Ok(total / solution.len() as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pred(image: &str, ids: &str) -> Prediction {
        Prediction {
            image: image.into(),
            ids: ids.split_whitespace().map(String::from).collect(),
        }
    }
    fn sol(image: &str, id: &str) -> SolutionRow {
        SolutionRow {
            image: image.into(),
            individual_id: id.into(),
        }
    }

    #[test]
    fn precision_at_each_rank() {
        let ids = ["a", "b", "c", "d", "e", "f"];
        assert_eq!(average_precision_at_5("a", &ids), 1.0);
        assert_eq!(average_precision_at_5("b", &ids), 0.5);
        assert_eq!(average_precision_at_5("c", &ids), 1.0 / 3.0);
        assert_eq!(average_precision_at_5("e", &ids), 0.2);
        assert_eq!(
            average_precision_at_5("f", &ids),
            0.0,
            "sixth id does not count"
        );
        assert_eq!(average_precision_at_5("z", &ids), 0.0);
    }

    #[test]
    fn duplicates_earn_once_and_keep_their_slots() {
        // The repeat of "a" takes rank 2, so "b" is found at rank 3.
        assert_eq!(average_precision_at_5("b", &["a", "a", "b"]), 1.0 / 3.0);
        assert_eq!(average_precision_at_5("a", &["x", "a", "a", "a"]), 0.5);
    }

    #[test]
    fn fewer_than_five_and_new_individual() {
        assert_eq!(
            average_precision_at_5("new_individual", &["x", "new_individual"]),
            0.5
        );
        let empty: [&str; 0] = [];
        assert_eq!(average_precision_at_5("x", &empty), 0.0);
    }

    #[test]
    fn map_over_a_hand_scored_submission() {
        let solution = [
            sol("1", "a"),
            sol("2", "new_individual"),
            sol("3", "c"),
            sol("4", "d"),
        ];
        let submission = [
            pred("4", "x y z w v"),
            pred("1", "a b"),
            pred("2", "b new_individual"),
            pred("3", "a b c c"),
        ];
        // (1 + 1/2 + 1/3 + 0) / 4
        let expected = (1.0 + 0.5 + 1.0 / 3.0) / 4.0;
        assert!((map_at_5(&solution, &submission).unwrap() - expected).abs() < 1e-12);
    }

    #[test]
    fn a_missing_or_unknown_row_is_an_error() {
        let solution = [sol("1", "a"), sol("2", "b")];
        assert_eq!(
            map_at_5(&solution, &[pred("1", "a")]),
            Err(ScoreError::MissingRow("2".into()))
        );
        assert_eq!(
            map_at_5(&solution, &[pred("1", "a"), pred("2", "b"), pred("3", "c")]),
            Err(ScoreError::UnknownImage("3".into()))
        );
        assert_eq!(map_at_5(&[], &[]), Err(ScoreError::Empty));
    }
}
