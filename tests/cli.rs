//! The `finprint` command as a user runs it.

use std::path::Path;
use std::process::Output;

mod common;

use common::run as finprint;

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `finprint score` of `submission` against `solution` (CSV texts) that must fail: its stderr.
fn score_error(solution: &str, submission: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let (sol, sub) = (
        dir.path().join("solution.csv"),
        dir.path().join("submission.csv"),
    );
    std::fs::write(&sol, solution).unwrap();
    std::fs::write(&sub, submission).unwrap();
    let o = finprint(&[
        "score",
        "--solution",
        path(&sol),
        "--submission",
        path(&sub),
    ]);
    assert!(!o.status.success());
    stderr(&o)
}

#[test]
fn synth_stats_score_and_folds_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("cat");
    let o = finprint(&[
        "synth",
        "--out",
        path(&data),
        "--individuals",
        "30",
        "--seed",
        "3",
        "--width",
        "128",
        "--height",
        "96",
        "--new-share",
        "0.2",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("30 individuals"), "{}", stdout(&o));

    let o = finprint(&["stats", "--data", path(&data)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    assert!(
        text.contains("individuals  24"),
        "6 of 30 are test-only: {text}"
    );

    // The solution scored against itself is perfect.
    let solution = data.join("test_solution.csv");
    let perfect = dir.path().join("perfect.csv");
    let rows = std::fs::read_to_string(&solution)
        .unwrap()
        .replace("image,individual_id", "image,predictions");
    std::fs::write(&perfect, rows).unwrap();
    let o = finprint(&[
        "score",
        "--solution",
        path(&solution),
        "--submission",
        path(&perfect),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o).trim(), "MAP@5 1.00000");

    let o = finprint(&[
        "score",
        "--solution",
        path(&solution),
        "--submission",
        path(&data.join("sample_submission.csv")),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));

    let folds = dir.path().join("folds.csv");
    let o = finprint(&[
        "folds",
        "--data",
        path(&data),
        "--out",
        path(&folds),
        "--folds",
        "3",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = std::fs::read_to_string(&folds).unwrap();
    assert!(text.starts_with("image,individual_id,fold,role\n"));
    assert!(text.contains(",unseen\n") && text.contains(",gallery\n"));
}

#[test]
fn a_missing_submission_row_is_a_clear_error() {
    let err = score_error(
        "image,individual_id\na.jpg,x\nb.jpg,new_individual\n",
        "image,predictions\na.jpg,x y\n",
    );
    assert!(
        err.contains("b.jpg") && err.contains("submission.csv"),
        "{err}"
    );
}

#[test]
fn a_malformed_csv_row_names_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("train.csv");
    std::fs::write(
        &csv,
        "image,species,individual_id\n1.jpg,beluga,a\n2.jpg,,b\n",
    )
    .unwrap();
    let o = finprint(&["stats", "--data", path(&csv)]);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(
        err.contains("train.csv:3") && err.contains("species"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn a_row_with_more_fields_than_its_header_names_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("train.csv");
    std::fs::write(
        &csv,
        "image,species,individual_id\n1.jpg,beluga,a\nb,c.jpg,beluga,b\n",
    )
    .unwrap();
    let o = finprint(&["stats", "--data", path(&csv)]);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(
        err.contains("train.csv:3") && err.contains("4 fields"),
        "{err}"
    );
}

#[test]
fn a_submission_row_of_six_predictions_is_refused() {
    let err = score_error(
        "image,individual_id\na.jpg,x\n",
        "image,predictions\na.jpg,u v w x y z\n",
    );
    assert!(
        err.contains("submission.csv:2") && err.contains("6 predictions"),
        "{err}"
    );
}

#[test]
fn training_on_missing_data_fails_before_writing_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let o = finprint(&[
        "train",
        "--data",
        path(&dir.path().join("nowhere")),
        "--out",
        path(&run),
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("nowhere"), "{}", stderr(&o));
    assert!(!run.exists(), "no run folder is left behind");
}
