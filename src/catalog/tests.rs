//! Catalogue operations that need no model: import, decisions, merges, history, export.

use super::*;

/// A small JPEG whose pixels depend on `seed`.
fn jpeg(seed: u8) -> Vec<u8> {
    let img = image::RgbImage::from_fn(32, 24, |x, y| {
        image::Rgb([seed.wrapping_mul(37), (x * 7) as u8, (y * 11) as u8 ^ seed])
    });
    let mut out = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 90)
        .encode_image(&img)
        .unwrap();
    out
}

/// A Kaggle folder: photos p0..p5 of individuals a (3 photos), b (2), c (1).
fn kaggle(dir: &Path) {
    let rows = [
        ("p0.jpg", "a"),
        ("p1.jpg", "a"),
        ("p2.jpg", "a"),
        ("p3.jpg", "b"),
        ("p4.jpg", "b"),
        ("p5.jpg", "c"),
    ];
    let mut csv = String::from("image,species,individual_id\n");
    std::fs::create_dir_all(dir.join("train_images")).unwrap();
    for (i, (image, id)) in rows.iter().enumerate() {
        // "bottlenose_dolpin" is normalised on import.
        csv += &format!("{image},bottlenose_dolpin,{id}\n");
        std::fs::write(dir.join("train_images").join(image), jpeg(i as u8)).unwrap();
    }
    std::fs::write(dir.join("train.csv"), csv).unwrap();
}

fn imported() -> (tempfile::TempDir, Catalog) {
    let tmp = tempfile::tempdir().unwrap();
    kaggle(&tmp.path().join("kaggle"));
    let cat = Catalog::open(&tmp.path().join("cat")).unwrap();
    let s = cat
        .import(&tmp.path().join("kaggle"), "tester", &ProgressBar::hidden())
        .unwrap();
    assert_eq!(
        s,
        ImportSummary {
            individuals: 3,
            photos: 6,
            decisions: 6
        }
    );
    (tmp, cat)
}

#[test]
fn kaggle_import_records_individuals_photos_and_who_imported_them() {
    let (_tmp, cat) = imported();
    let list = cat.individuals().unwrap();
    let ids: Vec<(&str, usize, &str)> = list
        .iter()
        .map(|i| (i.id.as_str(), i.photos, i.species.as_str()))
        .collect();
    assert_eq!(
        ids,
        [
            ("a", 3, "bottlenose_dolphin"),
            ("b", 2, "bottlenose_dolphin"),
            ("c", 1, "bottlenose_dolphin")
        ]
    );
    let d = cat.decisions().unwrap();
    assert!(d
        .iter()
        .all(|d| d.kind == "import" && d.decided_by == "tester"));
    assert!(d[0].decided_at.ends_with('Z') && d[0].decided_at.len() == 24);
    // A second import into the same catalogue is refused.
    let err = cat
        .import(cat.dir(), "tester", &ProgressBar::hidden())
        .unwrap_err();
    assert!(format!("{err:#}").contains("not empty"), "{err:#}");
}

#[test]
fn decisions_assign_pending_photos_once_and_record_who_and_when() {
    let (_tmp, cat) = imported();
    let sighting = Sighting {
        date: "2026-11-28".into(),
        place: " Hauraki Gulf ".into(),
        photographer: "Ana".into(),
    };
    let up = cat
        .store_upload("boat1.jpg", &jpeg(100), &sighting)
        .unwrap();
    // The same bytes uploaded again are kept once, under the same name.
    assert_eq!(
        cat.store_upload("copy.jpg", &jpeg(100), &Sighting::default())
            .unwrap(),
        up
    );
    assert_eq!(cat.counts().unwrap().pending, 1);

    let confirm = Decision::Confirm {
        image: up.clone(),
        individual_id: "b".into(),
    };
    let r = cat.decide(&confirm, "Ana", "clear notch").unwrap();
    assert_eq!(
        (r.kind.as_str(), r.image.as_str(), r.individual_id.as_str()),
        ("confirm", up.as_str(), "b")
    );
    assert_eq!(r.decided_by, "Ana");
    // Deciding it again is a conflict, and changes nothing.
    let err = cat.decide(&confirm, "Bo", "").unwrap_err();
    assert!(matches!(
        err.downcast_ref::<CatalogError>(),
        Some(CatalogError::Conflict(_))
    ));
    let b = cat.individual("b").unwrap();
    assert_eq!(b.summary.photos, 3);
    let s = b.sightings.iter().find(|p| p.image == up).unwrap();
    assert_eq!(s.sighting.place, "Hauraki Gulf");
    assert_eq!(s.species, "bottlenose_dolphin");
    assert_eq!(b.history.last().unwrap().note, "clear notch");

    // A new individual, with a generated id.
    let up2 = cat
        .store_upload("x.png", &jpeg(101), &Sighting::default())
        .unwrap();
    let r = cat
        .decide(
            &Decision::New {
                image: up2.clone(),
                individual_id: None,
                species: Some("humpback_whale".into()),
            },
            "Bo",
            "",
        )
        .unwrap();
    assert!(r.individual_id.starts_with("fp-"), "{}", r.individual_id);
    let n = cat.individual(&r.individual_id).unwrap();
    assert_eq!((n.summary.photos, n.summary.created_by.as_str()), (1, "Bo"));
    assert_eq!(n.summary.species, "humpback_whale");

    // Refusals: unknown photo, unknown individual, no name, taken id.
    let unknown = cat.decide(
        &Decision::Confirm {
            image: "nope.jpg".into(),
            individual_id: "a".into(),
        },
        "Bo",
        "",
    );
    assert!(matches!(
        unknown.unwrap_err().downcast_ref::<CatalogError>(),
        Some(CatalogError::NotFound(_))
    ));
    let up3 = cat
        .store_upload("y.jpg", &jpeg(102), &Sighting::default())
        .unwrap();
    let err = cat
        .decide(
            &Decision::Confirm {
                image: up3.clone(),
                individual_id: "zz".into(),
            },
            "Bo",
            "",
        )
        .unwrap_err();
    assert!(err.to_string().contains("'zz'"), "{err}");
    assert!(cat.decide(&confirm, " ", "").is_err());
    let err = cat
        .decide(
            &Decision::New {
                image: up3,
                individual_id: Some("a".into()),
                species: None,
            },
            "Bo",
            "",
        )
        .unwrap_err();
    assert!(err.to_string().contains("already exists"), "{err}");
    let c = cat.counts().unwrap();
    assert_eq!(
        (c.individuals, c.photos, c.pending, c.decisions),
        (4, 9, 1, 8)
    );
}

#[test]
fn merge_keeps_the_merged_id_and_its_history() {
    let (_tmp, cat) = imported();
    cat.decide(
        &Decision::Merge {
            from: "c".into(),
            into: "a".into(),
        },
        "Ana",
        "same scar",
    )
    .unwrap();
    let list: Vec<String> = cat
        .individuals()
        .unwrap()
        .into_iter()
        .map(|i| i.id)
        .collect();
    assert_eq!(list, ["a", "b"]);
    let a = cat.individual("a").unwrap();
    assert_eq!(a.summary.photos, 4);
    assert_eq!(a.summary.aliases, ["c"]);
    // The merged id still answers, with the survivor's page; its photo keeps its recorded id.
    let c = cat.individual("c").unwrap();
    assert_eq!(
        (c.summary.id.as_str(), c.requested.as_deref()),
        ("a", Some("c"))
    );
    assert!(c
        .sightings
        .iter()
        .any(|p| p.image == "p5.jpg" && p.individual_id.as_deref() == Some("c")));
    let merge = a.history.iter().find(|d| d.kind == "merge").unwrap();
    assert_eq!(
        (merge.other_id.as_str(), merge.individual_id.as_str()),
        ("c", "a")
    );
    // A merged id resolves: merging it again is merging an individual with itself; confirming to
    // it confirms to the survivor.
    let err = cat
        .decide(
            &Decision::Merge {
                from: "c".into(),
                into: "a".into(),
            },
            "Ana",
            "",
        )
        .unwrap_err();
    assert!(err.to_string().contains("one individual"), "{err}");
    let up = cat
        .store_upload("q.jpg", &jpeg(9), &Sighting::default())
        .unwrap();
    let r = cat
        .decide(
            &Decision::Confirm {
                image: up,
                individual_id: "c".into(),
            },
            "Ana",
            "",
        )
        .unwrap();
    assert_eq!(r.individual_id, "a");
    // a merged into b: c resolves through a to b.
    cat.decide(
        &Decision::Merge {
            from: "a".into(),
            into: "b".into(),
        },
        "Ana",
        "",
    )
    .unwrap();
    assert_eq!(cat.individual("c").unwrap().summary.id, "b");
    assert_eq!(cat.individual("b").unwrap().summary.photos, 7);
    assert_eq!(cat.individual("b").unwrap().summary.aliases, ["a", "c"]);
}

#[test]
fn export_then_import_loses_nothing() {
    let (tmp, cat) = imported();
    let up = cat
        .store_upload(
            "u.jpg",
            &jpeg(50),
            &Sighting {
                date: "2026-01-02".into(),
                place: "Kaikōura, \"north\" bay".into(),
                photographer: "Ana".into(),
            },
        )
        .unwrap();
    cat.decide(
        &Decision::New {
            image: up,
            individual_id: Some("new-1".into()),
            species: None,
        },
        "Ana",
        "note, with comma\nand a line",
    )
    .unwrap();
    cat.decide(
        &Decision::Merge {
            from: "b".into(),
            into: "a".into(),
        },
        "Bo",
        "",
    )
    .unwrap();
    cat.store_upload("pending.jpg", &jpeg(51), &Sighting::default())
        .unwrap();

    let first = tmp.path().join("export1");
    let s1 = cat.export(&first, &ProgressBar::hidden()).unwrap();
    let again = Catalog::open(&tmp.path().join("cat2")).unwrap();
    assert_eq!(
        again
            .import(&first, "ignored", &ProgressBar::hidden())
            .unwrap(),
        s1
    );
    let second = tmp.path().join("export2");
    again.export(&second, &ProgressBar::hidden()).unwrap();
    for f in [
        "individuals.csv",
        "photos.csv",
        "decisions.csv",
        "train.csv",
    ] {
        let a = std::fs::read_to_string(first.join(f)).unwrap();
        assert_eq!(a, std::fs::read_to_string(second.join(f)).unwrap(), "{f}");
    }
    assert_eq!(again.photos().unwrap(), cat.photos().unwrap());
    assert_eq!(again.decisions().unwrap(), cat.decisions().unwrap());
    assert_eq!(again.individual("b").unwrap(), cat.individual("b").unwrap());
    for p in cat.photos().unwrap() {
        let a = std::fs::read(cat.images_dir().join(&p.image)).unwrap();
        assert_eq!(
            a,
            std::fs::read(second.join("train_images").join(&p.image)).unwrap()
        );
    }
    // train.csv names the survivor of a merge, and reads as a Kaggle catalogue.
    let train = crate::data::read_train_csv(&first.join("train.csv")).unwrap();
    assert_eq!(train.rows.len(), 7);
    assert!(train.rows.iter().all(|r| r.individual_id != "b"));
}

#[test]
fn unsafe_names_and_non_images_are_refused() {
    assert!(is_safe_name("a1_B-2.jpg"));
    for bad in ["", "../x.jpg", ".hidden", "a/b.jpg", "a b.jpg", "c:\\x"] {
        assert!(!is_safe_name(bad), "{bad}");
    }
    let tmp = tempfile::tempdir().unwrap();
    let cat = Catalog::open(tmp.path()).unwrap();
    let err = cat
        .store_upload("notes.txt", b"hello", &Sighting::default())
        .unwrap_err();
    assert!(
        err.to_string().contains("notes.txt: not a usable image"),
        "{err}"
    );
    assert_eq!(cat.counts().unwrap().photos, 0);
}

#[test]
fn a_decision_survives_a_crash_without_a_clean_close() {
    let (tmp, cat) = imported();
    let up = cat
        .store_upload("u.jpg", &jpeg(70), &Sighting::default())
        .unwrap();
    cat.decide(
        &Decision::Confirm {
            image: up.clone(),
            individual_id: "a".into(),
        },
        "Ana",
        "",
    )
    .unwrap();
    // No close, no checkpoint: the connection is leaked as a killed process would leave it.
    std::mem::forget(cat);
    // A write killed before its rename leaves its temporary file, removed on the next open.
    let images = tmp.path().join("cat/images");
    let orphan = images.join(format!("{up}.4294967295-0.tmp"));
    std::fs::write(&orphan, b"half a photo").unwrap();
    let reopened = Catalog::open(&tmp.path().join("cat")).unwrap();
    assert!(!orphan.exists() && images.join(&up).is_file());
    let a = reopened.individual("a").unwrap();
    assert!(a.sightings.iter().any(|p| p.image == up));
    assert_eq!(reopened.integrity_check().unwrap(), "ok");
}

/// Local matching at `size` pixels, without a calibration.
fn local_at(size: u32) -> LocalSearch {
    let args = crate::local::LocalArgs {
        local: "rootsift".into(),
        local_size: size,
        ..Default::default()
    };
    LocalSearch::new(&args, None).unwrap()
}

fn stored_rows(cat: &Catalog) -> Vec<(String, String)> {
    let conn = cat.conn();
    let mut st = conn
        .prepare("SELECT image, extraction FROM local_features ORDER BY image")
        .unwrap();
    let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?))).unwrap();
    rows.collect::<rusqlite::Result<_>>().unwrap()
}

#[test]
fn local_features_are_stored_once_and_extracted_again_only_for_other_settings() {
    let (tmp, mut cat) = imported();
    let up = cat
        .store_upload("u.jpg", &jpeg(70), &Sighting::default())
        .unwrap();
    let local = local_at(128);
    let first = cat
        .attach_local(local.clone(), &ProgressBar::hidden())
        .unwrap();
    assert_eq!((first.extracted, first.unusable.len()), (7, 0));
    // As stored, they are what the matcher extracts from the photo.
    let stored = cat.features_of("p0.jpg", &local.matcher).unwrap();
    let rgb = crate::data::image::load_rgb(&cat.images_dir().join("p0.jpg")).unwrap();
    assert_eq!(stored, local.matcher.extract(&rgb));
    let before = (cat.counts().unwrap(), cat.decisions().unwrap());
    drop(cat);

    // Reopened with the same settings: nothing is extracted again.
    let mut cat = Catalog::open(&tmp.path().join("cat")).unwrap();
    let again = cat
        .attach_local(local.clone(), &ProgressBar::hidden())
        .unwrap();
    assert_eq!(again.extracted, 0);
    // Other settings: every photo again, its row replaced (one per photo).
    let other = cat
        .attach_local(local_at(96), &ProgressBar::hidden())
        .unwrap();
    assert_eq!(other.extracted, 7);
    let rows = stored_rows(&cat);
    assert_eq!(rows.len(), 7);
    assert!(rows.iter().any(|(image, _)| image == &up));
    assert!(
        rows.iter().all(|(_, tag)| tag.contains("\"size\":96")),
        "{rows:?}"
    );
    // Nothing else was touched.
    assert_eq!((cat.counts().unwrap(), cat.decisions().unwrap()), before);
    assert_eq!(cat.integrity_check().unwrap(), "ok");
}

#[test]
fn corrupt_local_features_are_named_and_extracted_again() {
    let (_tmp, mut cat) = imported();
    let local = local_at(128);
    cat.attach_local(local.clone(), &ProgressBar::hidden())
        .unwrap();
    let good = cat.features_of("p1.jpg", &local.matcher).unwrap();
    cat.conn()
        .execute(
            "UPDATE local_features SET features = x'0102030405' WHERE image = 'p1.jpg'",
            [],
        )
        .unwrap();
    let tag = serde_json::to_string(&local.matcher.extraction()).unwrap();
    let err = local::stored_features(&cat.conn(), "p1.jpg", &tag).unwrap_err();
    assert!(format!("{err:#}").contains("p1.jpg"), "{err:#}");
    // Read through the catalogue: extracted again, and stored sound.
    assert_eq!(cat.features_of("p1.jpg", &local.matcher).unwrap(), good);
    let fixed = local::stored_features(&cat.conn(), "p1.jpg", &tag).unwrap();
    assert_eq!(fixed, Some(good));
    // Corrupt again: attaching (which reads stored features to fit the whitening) still
    // succeeds.
    cat.conn()
        .execute(
            "UPDATE local_features SET features = x'0102030405' WHERE image = 'p1.jpg'",
            [],
        )
        .unwrap();
    cat.attach_local(local, &ProgressBar::hidden()).unwrap();
}

#[test]
fn matches_name_the_photo_they_do_not_know() {
    let (_tmp, cat) = imported();
    for (query, photo, named) in [
        ("p0.jpg", "nope.jpg", "nope.jpg"),
        ("../catalog.sqlite", "p0.jpg", "../catalog.sqlite"),
        ("p0.jpg", "", "''"),
    ] {
        let err = cat.matches(query, photo).unwrap_err();
        assert!(
            matches!(
                err.downcast_ref::<CatalogError>(),
                Some(CatalogError::NotFound(_))
            ),
            "{err}"
        );
        assert!(err.to_string().contains(named), "{err}");
    }
    // Without local matching attached, the default settings are extracted on demand, and kept.
    let m = cat.matches("p0.jpg", "p0.jpg").unwrap();
    assert_eq!(m.verified, m.lines.len());
    assert_eq!(stored_rows(&cat).len(), 1);
}

/// Without a calibration, attaching local matching fits the whitening on the catalogue's
/// stored descriptors (every photo's, in name order, when there are few); with one, the
/// calibration's whitening (here none) is kept; too few keypoints fit nothing.
#[test]
fn the_whitening_is_fitted_on_the_catalogues_descriptors_unless_calibrated() {
    use rand::{Rng, SeedableRng};
    let (_tmp, mut cat) = imported();
    let local = local_at(128);
    // The six tiny gradient photos give too few keypoints to fit a whitening on.
    let plain = cat
        .attach_local(local.clone(), &ProgressBar::hidden())
        .unwrap();
    assert_eq!(plain.whitened_on, 0);
    assert!(cat.local().unwrap().whitening().is_none());
    // Stored descriptors of known spread: 400 unit rows a photo, axis k scaled by 1 + k/32.
    let tag = serde_json::to_string(&local.matcher.extraction()).unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
    for p in 0..6 {
        let mut descriptors = Vec::new();
        for _ in 0..400 {
            let row: Vec<f32> = (0..128)
                .map(|k| rng.gen_range(-1.0f32..1.0) * (1.0 + k as f32 / 32.0))
                .collect();
            let norm = row.iter().map(|x| x * x).sum::<f32>().sqrt();
            descriptors.extend(row.iter().map(|x| x / norm));
        }
        let f = crate::local::Features {
            size: [128, 96],
            points: vec![[1.0, 1.0]; 400],
            dim: 128,
            descriptors,
        };
        local::store_features(&cat.conn(), &format!("p{p}.jpg"), &tag, &f).unwrap();
    }
    let fitted = cat
        .attach_local(local.clone(), &ProgressBar::hidden())
        .unwrap();
    assert_eq!((fitted.extracted, fitted.whitened_on), (0, 6));
    // As stored (descriptors in f16), every photo's rows in name order.
    let rows: Vec<f32> = (0..6)
        .flat_map(|p| {
            local::stored_features(&cat.conn(), &format!("p{p}.jpg"), &tag)
                .unwrap()
                .unwrap()
                .descriptors
        })
        .collect();
    let expected = crate::model::whitening::Whitening::principal(&rows, 128, 0.5).unwrap();
    assert_eq!(cat.local().unwrap().whitening(), Some(&expected));
    // The widest input axis (127, five times axis 0's spread) is scaled least.
    let w = cat.local().unwrap().whitening().unwrap();
    let gain = |i: usize| {
        w.proj[i * 128..(i + 1) * 128]
            .iter()
            .map(|x| x * x)
            .sum::<f32>()
    };
    assert!(gain(127) * 4.0 < gain(0), "{} vs {}", gain(127), gain(0));
    // A calibration brings its own whitening (none here), and nothing is fitted.
    let calibrated = LocalSearch::new(
        &crate::local::LocalArgs {
            local: "rootsift".into(),
            local_size: 128,
            ..Default::default()
        },
        Some(crate::local::calibration::Calibration {
            model: "zero-shot:efficientnet_lite0".into(),
            extraction: local.matcher.extraction(),
            shortlist: 100,
            lnbnn_k: 4,
            score: Default::default(),
            identity_score: Default::default(),
            geometry: Default::default(),
            max_rotation: 30.0,
            position_weight: 0.0,
            whitening_power: 0.5,
            whitening: None,
            fusion: crate::local::calibration::Fusion {
                embedding: crate::local::calibration::Logistic { a: 1.0, b: 0.0 },
                local: crate::local::calibration::Logistic { a: 1.0, b: 0.0 },
                embedding_weight: 0.5,
            },
            threshold: 0.5,
            photos: 20,
            map5: 1.0,
        }),
    )
    .unwrap();
    let kept = cat
        .attach_local(calibrated, &ProgressBar::hidden())
        .unwrap();
    assert_eq!(kept.whitened_on, 0);
    assert!(cat.local().unwrap().whitening().is_none());
}
