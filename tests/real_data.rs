//! Checks against the real Happywhale metadata in `../shared/data/happywhale/`. Each test
//! skips, saying so, when that data is absent.

use finprint::data::{read_train_csv, stats::Stats};
use std::path::PathBuf;

fn happywhale() -> Option<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/data/happywhale");
    if dir.join("train.csv").is_file() {
        Some(dir)
    } else {
        eprintln!(
            "skipped: {} not found (the real Happywhale metadata)",
            dir.display()
        );
        None
    }
}

#[test]
fn real_train_csv_matches_the_hand_count() {
    let Some(dir) = happywhale() else { return };
    let set = read_train_csv(&dir.join("train.csv")).unwrap();
    let stats = Stats::of(&set);
    assert_eq!(stats.images, 51_033);
    assert_eq!(stats.individuals, 15_587);
    assert_eq!(stats.singletons, 9_258);
    assert_eq!(stats.max_per_individual, 400);
    // 30 labels as written, 26 once the four typos are merged into their species.
    assert_eq!(stats.species.len(), 26);
    let fixed: Vec<(&str, &str, usize)> = stats
        .species_fixes
        .iter()
        .map(|((a, b), n)| (a.as_str(), b.as_str(), *n))
        .collect();
    assert_eq!(
        fixed,
        [
            ("bottlenose_dolpin", "bottlenose_dolphin", 1117),
            ("globis", "short_finned_pilot_whale", 116),
            ("kiler_whale", "killer_whale", 962),
            ("pilot_whale", "short_finned_pilot_whale", 262),
        ]
    );
    let bottlenose = stats
        .species
        .iter()
        .find(|s| s.species == "bottlenose_dolphin")
        .unwrap();
    assert_eq!(bottlenose.images, 9_664 + 1_117);
}

#[test]
fn real_sample_submission_reads() {
    let Some(dir) = happywhale() else { return };
    let sub = finprint::data::read_submission(&dir.join("sample_submission.csv")).unwrap();
    assert_eq!(sub.len(), 27_956);
    assert!(sub
        .iter()
        .all(|p| p.ids.len() == 5 && p.ids[4] == "new_individual"));
}
