//! The identification service end to end, without a browser: a small synthetic catalogue,
//! zero-shot EfficientNet-Lite0 features at 128 px, and the HTTP router driven in memory.
//! Each test skips, saying so, when the pretrained weights are absent.

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use clap::{Args, FromArgMatches};
use finprint::catalog::{Catalog, Decision, Embedder, Sighting};
use finprint::data::{read_solution, KaggleDir, NEW_INDIVIDUAL};
use finprint::local::calibration::{Calibration, Fusion, Logistic};
use finprint::local::LocalArgs;
use finprint::model::whitening::Whitening;
use finprint::network::Engine;
use finprint::runs::{ModelSpec, ZeroShot};
use finprint::search::IndexSpec;
use finprint::service::{open_catalog, router, AppState, ServeArgs};
use finprint::synth::{generate, SynthConfig};
use finprint::transforms::ImgSize;
use indicatif::ProgressBar;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use tower::ServiceExt;

mod common;

const TOKEN: &str = "test-token";

fn model() -> ModelSpec {
    ModelSpec::ZeroShot(
        ZeroShot {
            img_size: Some(ImgSize::square(128)),
            ..ZeroShot::new("efficientnet_lite0")
        },
        Engine::default(),
    )
}

/// A synthetic Kaggle folder and a catalogue imported from it and embedded, made once.
struct Fixture {
    _tmp: tempfile::TempDir,
    kaggle: KaggleDir,
    template: PathBuf,
}

fn fixture() -> Option<&'static Fixture> {
    static FIXTURE: OnceLock<Option<Fixture>> = OnceLock::new();
    FIXTURE
        .get_or_init(|| {
            let weights = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("weights/efficientnet_lite0.safetensors");
            if !weights.is_file() {
                eprintln!(
                    "skipped: {} is missing (run `bash tools/setup.sh`)",
                    weights.display()
                );
                return None;
            }
            tch::set_num_threads(2);
            let tmp = tempfile::tempdir().unwrap();
            let kaggle = KaggleDir::new(tmp.path().join("synth"));
            let cfg = SynthConfig {
                individuals: 48,
                width: 192,
                height: 128,
                max_photos: 10,
                seed: 1,
                ..SynthConfig::default()
            };
            generate(&kaggle, &cfg, &ProgressBar::hidden()).unwrap();
            let template = tmp.path().join("template");
            let mut cat = Catalog::open(&template).unwrap();
            cat.import(&kaggle.root, "test", &ProgressBar::hidden())
                .unwrap();
            let embedded = cat
                .attach(
                    Embedder::start(&model(), None).unwrap(),
                    IndexSpec::default(),
                    &ProgressBar::hidden(),
                )
                .unwrap();
            assert_eq!(embedded.embedded, cat.counts().unwrap().photos);
            Some(Fixture {
                _tmp: tmp,
                kaggle,
                template,
            })
        })
        .as_ref()
}

/// A copy of the template catalogue, attached to the model (nothing left to embed).
fn catalogue(f: &Fixture) -> (tempfile::TempDir, Catalog) {
    catalogue_on(f, IndexSpec::default())
}

/// A copy of the template catalogue, attached to the model with an index of kind `index`.
fn catalogue_on(f: &Fixture, index: IndexSpec) -> (tempfile::TempDir, Catalog) {
    let (tmp, dir) = template_copy(f);
    let mut cat = Catalog::open(&dir).unwrap();
    let embedded = cat
        .attach(
            Embedder::start(&model(), None).unwrap(),
            index,
            &ProgressBar::hidden(),
        )
        .unwrap();
    assert_eq!(embedded.embedded, 0, "the template's embeddings are reused");
    (tmp, cat)
}

/// A copy of the template catalogue's folder, in `TMP/cat`.
fn template_copy(f: &Fixture) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("cat");
    std::fs::create_dir_all(dir.join("images")).unwrap();
    for e in std::fs::read_dir(f.template.join("images")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dir.join("images").join(e.file_name())).unwrap();
    }
    std::fs::copy(
        f.template.join("catalog.sqlite"),
        dir.join("catalog.sqlite"),
    )
    .unwrap();
    (tmp, dir)
}

/// The test photos of individuals in the catalogue, with their truth, by name.
fn known_test_photos(f: &Fixture) -> Vec<(String, String)> {
    let mut rows: Vec<(String, String)> = read_solution(&f.kaggle.test_solution())
        .unwrap()
        .into_iter()
        .filter(|r| r.individual_id != NEW_INDIVIDUAL)
        .map(|r| (r.image, r.individual_id))
        .collect();
    rows.sort();
    rows
}

fn test_photo(f: &Fixture, name: &str) -> Vec<u8> {
    std::fs::read(f.kaggle.test_images().join(name)).unwrap()
}

/// Pending photos that cannot be decoded (a header bomb, a truncated JPEG, as stored before
/// they were refused) do not stop a start: each is skipped and named without the server's
/// path, and stays pending; the others are embedded.
#[test]
fn unusable_pending_photos_are_skipped_when_a_model_is_attached() {
    let Some(f) = fixture() else { return };
    let (_tmp, dir) = template_copy(f);
    let known = known_test_photos(f);
    let cat = Catalog::open(&dir).unwrap();
    let stored: Vec<String> = known[..3]
        .iter()
        .map(|(name, _)| {
            cat.store_upload(name, &test_photo(f, name), &Sighting::default())
                .unwrap()
        })
        .collect();
    let pending = cat.counts().unwrap().pending;
    drop(cat);
    let photo = test_photo(f, &known[1].0);
    std::fs::write(
        dir.join("images").join(&stored[1]),
        common::header_bomb(16000),
    )
    .unwrap();
    std::fs::write(
        dir.join("images").join(&stored[2]),
        [&photo[..photo.len() / 2], &[0xFF, 0xD9]].concat(),
    )
    .unwrap();
    let mut cat = Catalog::open(&dir).unwrap();
    let attached = cat
        .attach(
            Embedder::start(&model(), None).unwrap(),
            IndexSpec::default(),
            &ProgressBar::hidden(),
        )
        .unwrap();
    assert_eq!(attached.embedded, 1, "{attached:?}");
    assert_eq!(attached.unusable.len(), 2, "{attached:?}");
    let [bomb, cut] = [&attached.unusable[0], &attached.unusable[1]];
    let (bomb, cut) = if bomb.starts_with(&stored[1]) {
        (bomb, cut)
    } else {
        (cut, bomb)
    };
    assert!(
        bomb.starts_with(&stored[1]) && bomb.contains("limit"),
        "{bomb}"
    );
    assert!(
        cut.starts_with(&stored[2]) && cut.contains("truncated"),
        "{cut}"
    );
    let shown = dir.display().to_string();
    assert!(attached.unusable.iter().all(|m| !m.contains(&shown)));
    assert_eq!(cat.counts().unwrap().pending, pending);
}

#[test]
fn the_catalogue_runs_on_hnsw_with_the_exact_answers_and_grows_it() {
    let Some(f) = fixture() else { return };
    let (_a, flat) = catalogue(f);
    let hnsw_spec: IndexSpec = "hnsw:16,200".parse().unwrap();
    let (_b, hnsw) = catalogue_on(f, hnsw_spec);
    let photos = known_test_photos(f);
    for (name, _) in photos.iter().take(5) {
        let bytes = test_photo(f, name);
        let a = flat
            .identify(name, &bytes, &Sighting::default(), 5, 2)
            .unwrap();
        let b = hnsw
            .identify(name, &bytes, &Sighting::default(), 5, 2)
            .unwrap();
        let ids = |r: &finprint::catalog::Identification| -> Vec<String> {
            r.candidates
                .iter()
                .map(|c| c.individual_id.clone())
                .collect()
        };
        // A few hundred photos and a wide search: the graph finds the exact neighbours.
        assert_eq!(ids(&a), ids(&b), "{name}");
    }
    // A photo confirmed on the HNSW catalogue is its own best match at once.
    let (name, truth) = photos[0].clone();
    hnsw.decide(
        &Decision::Confirm {
            image: hnsw
                .identify(&name, &test_photo(f, &name), &Sighting::default(), 5, 1)
                .unwrap()
                .image,
            individual_id: truth.clone(),
        },
        "test",
        "",
    )
    .unwrap();
    let again = hnsw
        .identify(&name, &test_photo(f, &name), &Sighting::default(), 5, 1)
        .unwrap();
    assert_eq!(again.candidates[0].individual_id, truth);
    assert!(again.candidates[0].score > 0.999);
}

#[test]
fn a_confirmed_photo_is_searchable_at_once_and_a_new_individual_too() {
    let Some(f) = fixture() else { return };
    let (_tmp, cat) = catalogue(f);
    let before = cat.counts().unwrap();
    let (name, truth) = known_test_photos(f)[0].clone();
    let bytes = test_photo(f, &name);
    let found = cat
        .identify(&name, &bytes, &Sighting::default(), 5, 3)
        .unwrap();
    assert_eq!(found.candidates.len(), 5);
    assert_eq!(found.answers.len(), 5);
    assert!(found
        .candidates
        .windows(2)
        .all(|w| w[0].score >= w[1].score));
    for c in &found.candidates {
        assert!(!c.photos.is_empty() && c.photos.len() <= 3);
        assert!(
            (c.photos[0].score - c.score).abs() < 1e-5,
            "best photo = score"
        );
    }
    assert_eq!(found.individual_id, None);
    assert_eq!(cat.counts().unwrap().pending, 1);

    cat.decide(
        &Decision::Confirm {
            image: found.image.clone(),
            individual_id: truth.clone(),
        },
        "tester",
        "",
    )
    .unwrap();
    assert_eq!(cat.counts().unwrap().indexed, before.indexed + 1);
    // The same photo again: it is now in the catalogue, so its individual comes first with
    // similarity 1 (itself), without any retraining or rebuild.
    let again = cat
        .identify(&name, &bytes, &Sighting::default(), 5, 3)
        .unwrap();
    assert_eq!(again.individual_id.as_deref(), Some(truth.as_str()));
    assert_eq!(again.candidates[0].individual_id, truth);
    assert!(
        again.candidates[0].score > 0.999,
        "{}",
        again.candidates[0].score
    );
    assert_eq!(again.candidates[0].photos[0].image, found.image);

    // A photo declared new creates an individual that the next query finds.
    let (other, _) = known_test_photos(f)[1].clone();
    let bytes = test_photo(f, &other);
    let q = cat
        .identify(&other, &bytes, &Sighting::default(), 5, 3)
        .unwrap();
    let record = cat
        .decide(
            &Decision::New {
                image: q.image,
                individual_id: None,
                species: None,
            },
            "tester",
            "",
        )
        .unwrap();
    let q2 = cat
        .identify(&other, &bytes, &Sighting::default(), 5, 3)
        .unwrap();
    assert_eq!(q2.candidates[0].individual_id, record.individual_id);
    let c = cat.counts().unwrap();
    assert_eq!(c.individuals, before.individuals + 1);
    assert_eq!(c.indexed, before.indexed + 2);

    // Merging relabels the index at once: the new individual's photo now finds the survivor.
    cat.decide(
        &Decision::Merge {
            from: record.individual_id.clone(),
            into: truth.clone(),
        },
        "tester",
        "",
    )
    .unwrap();
    let q3 = cat
        .identify(&other, &bytes, &Sighting::default(), 5, 3)
        .unwrap();
    assert_eq!(q3.candidates[0].individual_id, truth);
}

#[test]
fn zero_shot_finds_most_known_test_photos_in_its_top_five() {
    let Some(f) = fixture() else { return };
    let (_tmp, cat) = catalogue(f);
    let known = known_test_photos(f);
    let hits = known
        .iter()
        .filter(|(name, truth)| {
            let found = cat
                .identify(name, &test_photo(f, name), &Sighting::default(), 5, 1)
                .unwrap();
            found.candidates.iter().any(|c| &c.individual_id == truth)
        })
        .count();
    // 41 catalogued individuals: chance puts the truth in the top five 5/41 of the time.
    let share = hits as f64 / known.len() as f64;
    eprintln!(
        "zero-shot top-5: {hits} of {} known test photos",
        known.len()
    );
    assert!(share > 0.5, "{hits} of {}", known.len());
}

// ---- the HTTP API ----

fn state(cat: Catalog, max_upload: usize) -> Arc<AppState> {
    AppState::new(Arc::new(cat), TOKEN.into(), max_upload)
}

/// A multipart form: (field, file name, bytes).
fn form(parts: &[(&str, Option<&str>, &[u8])]) -> (String, Vec<u8>) {
    let boundary = "finprint-test-boundary-7MA4YWxk";
    let mut body = Vec::new();
    for (field, file, bytes) in parts {
        body.extend(format!("--{boundary}\r\n").as_bytes());
        match file {
            Some(f) => body.extend(
                format!(
                    "Content-Disposition: form-data; name=\"{field}\"; filename=\"{f}\"\r\nContent-Type: application/octet-stream\r\n\r\n"
                )
                .as_bytes(),
            ),
            None => body.extend(
                format!("Content-Disposition: form-data; name=\"{field}\"\r\n\r\n").as_bytes(),
            ),
        }
        body.extend_from_slice(bytes);
        body.extend(b"\r\n");
    }
    body.extend(format!("--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

fn upload(path: &str, token: Option<&str>, parts: &[(&str, Option<&str>, &[u8])]) -> Request<Body> {
    let (kind, body) = form(parts);
    let mut req = Request::post(path).header(header::CONTENT_TYPE, kind);
    if let Some(t) = token {
        req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
    }
    req.body(Body::from(body)).unwrap()
}

fn json_post(path: &str, token: Option<&str>, body: &Value) -> Request<Body> {
    let mut req = Request::post(path).header(header::CONTENT_TYPE, "application/json");
    if let Some(t) = token {
        req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
    }
    req.body(Body::from(body.to_string())).unwrap()
}

async fn call(app: &axum::Router, req: Request<Body>) -> (StatusCode, Value) {
    let res = app.clone().oneshot(req).await.unwrap();
    let status = res.status();
    let bytes = axum::body::to_bytes(res.into_body(), usize::MAX)
        .await
        .unwrap();
    let value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    (status, value)
}

async fn get(app: &axum::Router, path: &str) -> (StatusCode, Value) {
    call(app, Request::get(path).body(Body::empty()).unwrap()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_answers_identify_decide_and_browse() {
    let Some(f) = fixture() else { return };
    let (_tmp, cat) = catalogue(f);
    let app = router(state(cat, 40_000));
    let (status, health) = get(&app, "/api/health").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(health["status"], "ok");
    let individuals = health["counts"]["individuals"].as_u64().unwrap();

    let (name, truth) = known_test_photos(f)[2].clone();
    let bytes = test_photo(f, &name);
    assert!(bytes.len() < 40_000);
    let photo = [
        ("photo", Some(name.as_str()), bytes.as_slice()),
        ("date", None, b"2026-11-28".as_slice()),
        ("place", None, b"Hauraki Gulf".as_slice()),
        ("photographer", None, b"Ana".as_slice()),
    ];

    // Writes without the token, or with a wrong one: 401 with a JSON reason.
    let (status, body) = call(&app, upload("/api/identify", None, &photo)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(body["error"].as_str().unwrap().contains("Bearer"), "{body}");
    let (status, _) = call(&app, upload("/api/identify", Some("nope"), &photo)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let decision = serde_json::json!({"kind": "merge", "from": "a", "into": "b", "by": "x"});
    let (status, _) = call(&app, json_post("/api/decisions", None, &decision)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    // Too large: 413 naming the limit. Not an image: 400 naming the upload.
    let big = vec![0xFFu8; 50_000];
    let (status, body) = call(
        &app,
        upload(
            "/api/identify",
            Some(TOKEN),
            &[("photo", Some("huge.jpg"), &big)],
        ),
    )
    .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    assert_eq!(
        body["error"], "huge.jpg: over the upload limit of 40 kB",
        "{body}"
    );
    // Far over: the body limit stops the upload before it is read whole.
    let huge = vec![0xFFu8; 300_000];
    let (status, body) = call(
        &app,
        upload(
            "/api/identify",
            Some(TOKEN),
            &[("photo", Some("huge.jpg"), &huge)],
        ),
    )
    .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("at most 40 kB"),
        "{body}"
    );
    let (status, body) = call(
        &app,
        upload(
            "/api/identify",
            Some(TOKEN),
            &[("photo", Some("notes.txt"), b"field notes, not a photo")],
        ),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .starts_with("notes.txt: not a usable image"),
        "{body}"
    );
    let (status, _) = call(&app, upload("/api/identify", Some(TOKEN), &[])).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    // Identify: five candidates with scores and photos, and the new-individual decision.
    let (status, found) = call(&app, upload("/api/identify", Some(TOKEN), &photo)).await;
    assert_eq!(status, StatusCode::OK, "{found}");
    let candidates = found["candidates"].as_array().unwrap();
    assert_eq!(candidates.len(), 5);
    assert_eq!(found["answers"].as_array().unwrap().len(), 5);
    assert!(found["new_individual"].is_boolean());
    assert_eq!(found["upload"], name.as_str());
    let image = found["image"].as_str().unwrap().to_string();
    let shown = candidates[0]["photos"][0]["image"].as_str().unwrap();
    let res = app
        .clone()
        .oneshot(
            Request::get(format!("/images/{shown}"))
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()[header::CONTENT_TYPE], "image/jpeg");
    for bad in [
        "/images/..%2Fcatalog.sqlite",
        "/images/catalog.sqlite",
        "/images/.x",
    ] {
        let (status, _) = get(&app, bad).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{bad}");
    }

    // Confirm: 201 with who and when; a second decision on the photo: 409.
    let confirm =
        serde_json::json!({"kind": "confirm", "image": image, "individual_id": truth, "by": "Ana"});
    let (status, record) = call(&app, json_post("/api/decisions", Some(TOKEN), &confirm)).await;
    assert_eq!(status, StatusCode::CREATED, "{record}");
    assert_eq!(record["decided_by"], "Ana");
    assert_eq!(record["individual_id"], truth.as_str());
    let (status, body) = call(&app, json_post("/api/decisions", Some(TOKEN), &confirm)).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    let (status, body) = call(
        &app,
        json_post(
            "/api/decisions",
            Some(TOKEN),
            &serde_json::json!({"kind": "guess"}),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");

    // The individual's page shows the sighting with its date, place and photographer.
    let (status, page) = get(&app, &format!("/api/individuals/{truth}")).await;
    assert_eq!(status, StatusCode::OK);
    let sighting = page["sightings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["image"] == image.as_str())
        .expect("the confirmed sighting");
    assert_eq!(sighting["place"], "Hauraki Gulf");
    assert_eq!(sighting["date"], "2026-11-28");
    assert_eq!(sighting["photographer"], "Ana");
    assert_eq!(
        page["history"].as_array().unwrap().last().unwrap()["kind"],
        "confirm"
    );
    let (status, _) = get(&app, "/api/individuals/nobody").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (_, list) = get(&app, "/api/individuals").await;
    assert_eq!(list.as_array().unwrap().len() as u64, individuals);

    // The web page and its script are served.
    let res = app
        .clone()
        .oneshot(Request::get("/").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_job_reports_progress_and_names_failed_photos() {
    let Some(f) = fixture() else { return };
    let (_tmp, cat) = catalogue(f);
    let spool = cat.spool_dir();
    let app = router(state(cat, 1_000_000));
    let known = known_test_photos(f);
    let a = test_photo(f, &known[3].0);
    let b = test_photo(f, &known[4].0);
    let parts = [
        ("photo", Some(known[3].0.as_str()), a.as_slice()),
        (
            "photo",
            Some("broken.png"),
            b"\x89PNG but not really".as_slice(),
        ),
        ("photo", Some(known[4].0.as_str()), b.as_slice()),
    ];
    let (status, _) = call(&app, upload("/api/jobs", None, &parts)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, job) = call(&app, upload("/api/jobs", Some(TOKEN), &parts)).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{job}");
    assert_eq!(job["total"], 3);
    let path = job["status"].as_str().unwrap().to_string();
    let mut last = Value::Null;
    for _ in 0..600 {
        let (status, s) = get(&app, &path).await;
        assert_eq!(status, StatusCode::OK);
        assert!(s["done"].as_u64().unwrap() <= 3);
        if s["finished"] == true {
            last = s;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(last["done"], 3, "{last}");
    let results = last["results"].as_array().unwrap();
    assert_eq!(
        results[0]["result"]["candidates"].as_array().unwrap().len(),
        5
    );
    assert!(results[1]["error"]
        .as_str()
        .unwrap()
        .starts_with("broken.png: not a usable image"));
    assert_eq!(results[2]["upload"], known[4].0.as_str());
    let (status, _) = get(&app, "/api/jobs/job-999").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // The photos were spooled to files, each removed once identified.
    let spooled = || std::fs::read_dir(&spool).map_or(0, |d| d.count());
    assert!(spool.is_dir());
    assert_eq!(spooled(), 0);
    // A batch refused part way (its third photo over the limit) leaves no file behind.
    let big = vec![0u8; 1_000_001];
    let parts = [
        ("photo", Some("a.jpg"), a.as_slice()),
        ("photo", Some("b.jpg"), b.as_slice()),
        ("photo", Some("big.jpg"), big.as_slice()),
    ];
    let (status, body) = call(&app, upload("/api/jobs", Some(TOKEN), &parts)).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    assert!(
        body["error"].as_str().unwrap().starts_with("big.jpg"),
        "{body}"
    );
    assert_eq!(spooled(), 0);
}

/// Many decisions at once, several on the same photo: each photo is decided exactly once, the
/// counts add up, no write is lost, and SQLite finds its file sound.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_decisions_never_corrupt_the_catalogue() {
    let Some(f) = fixture() else { return };
    let (_tmp, cat) = catalogue(f);
    let ids: Vec<String> = cat
        .individuals()
        .unwrap()
        .into_iter()
        .map(|i| i.id)
        .collect();
    let before = cat.counts().unwrap();
    // Twelve pending photos: synthetic test photos.
    let mut pending = Vec::new();
    for row in read_solution(&f.kaggle.test_solution())
        .unwrap()
        .iter()
        .take(12)
    {
        let name = &row.image;
        pending.push(
            cat.store_upload(name, &test_photo(f, name), &Sighting::default())
                .unwrap(),
        );
    }
    let cat = Arc::new(cat);
    let app = router(AppState::new(cat.clone(), TOKEN.into(), 1_000_000));

    // Per photo: two confirms to different individuals and one "new", all racing.
    let mut requests = Vec::new();
    for (i, image) in pending.iter().enumerate() {
        for j in 0..2 {
            let id = &ids[(i + j) % ids.len()];
            requests.push(serde_json::json!({"kind": "confirm", "image": image, "individual_id": id, "by": format!("r{j}")}));
        }
        requests.push(serde_json::json!({"kind": "new", "image": image, "by": "r2"}));
    }
    // And merges of disjoint pairs of catalogued individuals, each sent twice.
    for k in 0..4 {
        let m = serde_json::json!({"kind": "merge", "from": ids[2 * k], "into": ids[2 * k + 1], "by": "m"});
        requests.push(m.clone());
        requests.push(m);
    }
    let tasks: Vec<_> = requests
        .into_iter()
        .map(|body| {
            let app = app.clone();
            tokio::spawn(async move {
                let (status, value) =
                    call(&app, json_post("/api/decisions", Some(TOKEN), &body)).await;
                (body, status, value)
            })
        })
        .collect();
    let mut accepted = Vec::new();
    for t in tasks {
        let (body, status, value) = t.await.unwrap();
        match status {
            StatusCode::CREATED => accepted.push((body, value)),
            StatusCode::CONFLICT => {}
            other => panic!("{other}: {value} for {body}"),
        }
    }
    // Exactly one decision per photo and one per merge pair won.
    let on_photos: Vec<_> = accepted
        .iter()
        .filter(|(b, _)| b["kind"] != "merge")
        .collect();
    assert_eq!(on_photos.len(), pending.len());
    let mut decided: Vec<&str> = on_photos
        .iter()
        .map(|(b, _)| b["image"].as_str().unwrap())
        .collect();
    decided.sort();
    decided.dedup();
    assert_eq!(decided.len(), pending.len());
    let merges = accepted.len() - on_photos.len();
    assert_eq!(merges, 4);
    let news = on_photos.iter().filter(|(b, _)| b["kind"] == "new").count();

    let after = cat.counts().unwrap();
    assert_eq!(after.pending, 0);
    assert_eq!(after.photos, before.photos + pending.len());
    assert_eq!(after.decisions, before.decisions + pending.len() + merges);
    assert_eq!(after.individuals, before.individuals + news - merges);
    assert_eq!(after.merged, before.merged + merges);
    assert_eq!(after.indexed, before.indexed + pending.len());
    assert_eq!(cat.integrity_check().unwrap(), "ok");
    // Every accepted answer is what the catalogue holds.
    let photos = cat.photos().unwrap();
    for (body, record) in &on_photos {
        let p = photos
            .iter()
            .find(|p| p.image == body["image"].as_str().unwrap())
            .unwrap();
        assert_eq!(p.individual_id.as_deref(), record["individual_id"].as_str());
    }
    // And it survives a reopen from disk (nothing left only in memory).
    let reopened = Catalog::open(cat.dir()).unwrap();
    assert_eq!(reopened.counts().unwrap().decisions, after.decisions);
    assert_eq!(reopened.integrity_check().unwrap(), "ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_refusal_is_json_and_the_token_comes_before_the_body() {
    let Some(f) = fixture() else { return };
    let (_tmp, cat) = catalogue(f);
    let app = router(state(cat, 40_000));
    // Unknown pages and methods: 404 and 405 with a JSON reason.
    let (status, body) = get(&app, "/api/nothing-here").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("/api/nothing-here"),
        "{body}"
    );
    let (status, body) = get(&app, "/api/decisions").await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert!(body["error"].as_str().unwrap().contains("GET"), "{body}");
    // A 3 MB decision without the token: 401 from the headers, not a 413 after reading it.
    let huge = Request::post("/api/decisions")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(vec![b' '; 3_000_000]))
        .unwrap();
    let (status, body) = call(&app, huge).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(body["error"].is_string(), "{body}");
    // With the token, the same body is too large: 413 as JSON.
    let huge = Request::post("/api/decisions")
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::AUTHORIZATION, format!("Bearer {TOKEN}"))
        .body(Body::from(vec![b' '; 3_000_000]))
        .unwrap();
    let (status, body) = call(&app, huge).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(body["error"].is_string(), "{body}");
    // Text fields: at most MAX_TEXT bytes, and UTF-8.
    let (name, _) = known_test_photos(f)[1].clone();
    let bytes = test_photo(f, &name);
    let long = vec![b'x'; finprint::service::MAX_TEXT + 1];
    for (field, value) in [
        ("place", long.as_slice()),
        ("photographer", b"Ana \xff".as_slice()),
    ] {
        let parts = [
            ("photo", Some(name.as_str()), bytes.as_slice()),
            (field, None, value),
        ];
        let (status, body) = call(&app, upload("/api/identify", Some(TOKEN), &parts)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{field}: {body}");
        assert!(body["error"].as_str().unwrap().contains(field), "{body}");
    }
}

/// Refusals name the input and never a server path; requests that are not what a route
/// takes (not multipart, a path that is not UTF-8, a file name that is not UTF-8) answer JSON.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_name_the_input_and_never_a_server_path() {
    let Some(f) = fixture() else { return };
    let (_tmp, cat) = catalogue(f);
    let dir = cat.dir().to_path_buf();
    let shown = dir.display().to_string();
    let app = router(state(cat, 1_000_000));
    let (name, _) = known_test_photos(f)[0].clone();
    let photo = test_photo(f, &name);

    // Truncated and corrupt uploads: 400 naming the upload.
    let mut scratched = photo.clone();
    let mid = scratched.len() / 2;
    scratched[mid..mid + 40].fill(0x55);
    let cut = [&photo[..photo.len() / 2], &[0xFF, 0xD9]].concat();
    for (upload, bytes, says) in [
        ("cut.jpg", cut, "truncated"),
        ("scratched.jpg", scratched, "corrupt"),
    ] {
        let parts = [("photo", Some(upload), bytes.as_slice())];
        let (status, body) = call(&app, upload_req(&parts)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        let error = body["error"].as_str().unwrap();
        assert!(error.starts_with(upload) && error.contains(says), "{error}");
    }

    // Not a multipart request; a multipart body cut short: JSON.
    let req = Request::post("/api/identify")
        .header(header::AUTHORIZATION, format!("Bearer {TOKEN}"))
        .header(header::CONTENT_TYPE, "text/plain")
        .body(Body::from("hello"))
        .unwrap();
    let (status, body) = call(&app, req).await;
    assert!(
        status.is_client_error() && body["error"].is_string(),
        "{status} {body}"
    );
    let (kind, full) = form(&[("photo", Some(name.as_str()), photo.as_slice())]);
    let req = Request::post("/api/jobs")
        .header(header::AUTHORIZATION, format!("Bearer {TOKEN}"))
        .header(header::CONTENT_TYPE, kind)
        .body(Body::from(full[..full.len() / 2].to_vec()))
        .unwrap();
    let (status, body) = call(&app, req).await;
    assert!(
        status.is_client_error() && body["error"].is_string(),
        "{status} {body}"
    );

    // Paths that are not UTF-8: JSON.
    for path in [
        "/images/%FF%FE.jpg",
        "/api/individuals/%C3%28",
        "/api/jobs/job-%FF",
    ] {
        let (status, body) = get(&app, path).await;
        assert!(
            status.is_client_error() && body["error"].is_string(),
            "{path}: {status} {body}"
        );
    }

    // A file name that is not UTF-8: 400 naming the field, not stored under a mangled name.
    let (kind, mut bytes) = form(&[("photo", Some("NAME.jpg"), photo.as_slice())]);
    let at = bytes.windows(4).position(|w| w == b"NAME").unwrap();
    bytes[at..at + 4].copy_from_slice(b"\xffAM\xfe");
    let req = Request::post("/api/identify")
        .header(header::AUTHORIZATION, format!("Bearer {TOKEN}"))
        .header(header::CONTENT_TYPE, kind)
        .body(Body::from(bytes))
        .unwrap();
    let (status, body) = call(&app, req).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(
        body["error"].as_str().unwrap().starts_with("photo"),
        "{body}"
    );

    // A failure of the server itself (its images folder gone, a file in its place): 500
    // naming the upload, the folder only in the server's log.
    std::fs::remove_dir_all(dir.join("images")).unwrap();
    std::fs::write(dir.join("images"), b"not a folder").unwrap();
    let parts = [("photo", Some("fin.jpg"), photo.as_slice())];
    let (status, body) = call(&app, upload_req(&parts)).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{body}");
    let error = body["error"].as_str().unwrap();
    assert!(
        error.starts_with("fin.jpg") && !error.contains(&shown),
        "{error}"
    );
    assert!(
        !error.contains("/tmp") && !error.contains("images/"),
        "{error}"
    );
}

/// An identify request with the token.
fn upload_req(parts: &[(&str, Option<&str>, &[u8])]) -> Request<Body> {
    upload("/api/identify", Some(TOKEN), parts)
}

// ---- local features ----

/// A Kaggle folder of spotted animals (`common::spot_animal`): `catalogued` photos of each in
/// `train_images/` (`aNN_P.png`, individual `animalNN`), and one more photo of each returned
/// as a query (PNG bytes, truth).
fn spotted(dir: &Path, animals: usize, catalogued: usize, seed: u64) -> Vec<(Vec<u8>, String)> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    std::fs::create_dir_all(dir.join("train_images")).unwrap();
    let mut csv = String::from("image,species,individual_id\n");
    let mut queries = Vec::new();
    for a in 0..animals {
        let spots = common::spot_animal(&mut rng);
        for p in 0..catalogued {
            let name = format!("a{a:02}_{p}.png");
            let photo = common::spot_photo(&spots, &mut rng);
            photo.save(dir.join("train_images").join(&name)).unwrap();
            csv += &format!("{name},spotted_seal,animal{a:02}\n");
        }
        queries.push((
            png(&common::spot_photo(&spots, &mut rng)),
            format!("animal{a:02}"),
        ));
    }
    std::fs::write(dir.join("train.csv"), csv).unwrap();
    queries
}

fn png(img: &image::RgbImage) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

/// `finprint serve ARGS` as parsed.
fn serve_args(args: &[&str]) -> ServeArgs {
    let cmd = ServeArgs::augment_args(clap::Command::new("serve"));
    ServeArgs::from_arg_matches(
        &cmd.get_matches_from(std::iter::once("serve").chain(args.iter().copied())),
    )
    .unwrap()
}

/// Two photos of one spot pattern, the second shifted by (14, 9) pixels, match along lines
/// that all make that shift; a photo of other spots matches along few or none. Needs no model.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn matches_draw_lines_between_the_same_spots_and_refuse_unknown_photos() {
    let tmp = tempfile::tempdir().unwrap();
    let kaggle = tmp.path().join("kaggle");
    std::fs::create_dir_all(kaggle.join("train_images")).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let (a, b) = (common::spot_animal(&mut rng), common::spot_animal(&mut rng));
    let a1 = common::spot_photo(&a, &mut rng);
    let (dx, dy) = (14u32, 9u32);
    let a2 = image::RgbImage::from_fn(a1.width(), a1.height(), |x, y| {
        *a1.get_pixel(x.saturating_sub(dx), y.saturating_sub(dy))
    });
    let b1 = common::spot_photo(&b, &mut rng);
    for (name, img) in [("a1.png", &a1), ("a2.png", &a2), ("b1.png", &b1)] {
        img.save(kaggle.join("train_images").join(name)).unwrap();
    }
    std::fs::write(
        kaggle.join("train.csv"),
        "image,species,individual_id\na1.png,seal,a\na2.png,seal,a\nb1.png,seal,b\n",
    )
    .unwrap();
    let cat = Catalog::open(&tmp.path().join("cat")).unwrap();
    cat.import(&kaggle, "test", &ProgressBar::hidden()).unwrap();
    let app = router(state(cat, 1_000_000));

    let (status, same) = get(&app, "/api/matches?query=a1.png&photo=a2.png").await;
    assert_eq!(status, StatusCode::OK, "{same}");
    let lines = same["lines"].as_array().unwrap();
    assert_eq!(same["verified"].as_u64().unwrap() as usize, lines.len());
    assert!(lines.len() >= 10, "{} lines", lines.len());
    // Every line within RANSAC's tolerance (3% of the longer side) of the shift, and most on it.
    let (w, h) = (a1.width() as f64, a1.height() as f64);
    let mut shifts: Vec<(f64, f64)> = lines
        .iter()
        .map(|line| {
            let at = |side: &str, i: usize| line[side][i].as_f64().unwrap();
            (
                (at("candidate", 0) - at("query", 0)) * w - f64::from(dx),
                (at("candidate", 1) - at("query", 1)) * h - f64::from(dy),
            )
        })
        .collect();
    assert!(
        shifts.iter().all(|(x, y)| x.hypot(*y) < 0.035 * w),
        "{shifts:?}"
    );
    shifts.sort_by(|a, b| a.0.hypot(a.1).total_cmp(&b.0.hypot(b.1)));
    let (mx, my) = shifts[shifts.len() / 2];
    assert!(
        mx.hypot(my) < 2.0,
        "half the lines are further than ({mx:.1}, {my:.1}) off the shift"
    );
    let (status, other) = get(&app, "/api/matches?query=a1.png&photo=b1.png").await;
    assert_eq!(status, StatusCode::OK, "{other}");
    let others = other["verified"].as_u64().unwrap() as usize;
    eprintln!("same spots: {} lines; other spots: {others}", lines.len());
    assert!(others * 4 <= lines.len(), "{others} lines to other spots");

    // Unknown and unsafe names: 404 naming them; a missing photo: 400, as JSON.
    for (path, named) in [
        ("/api/matches?query=a1.png&photo=zz.png", "zz.png"),
        (
            "/api/matches?query=..%2Fcatalog.sqlite&photo=a1.png",
            "../catalog.sqlite",
        ),
    ] {
        let (status, body) = get(&app, path).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
        assert!(body["error"].as_str().unwrap().contains(named), "{body}");
    }
    let (status, body) = get(&app, "/api/matches?query=a1.png").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("photo=NAME"),
        "{body}"
    );
}

/// `serve --local rootsift` on spotted animals that the embedding barely tells apart: each
/// query's own animal ranks first, with the photo that matched and its inliers; the features
/// are extracted once; a saved calibration ranks by the fused probability, and one fitted
/// for another model is refused naming its file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identify_with_local_features_ranks_the_spotted_animal_first() {
    if fixture().is_none() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let kaggle = tmp.path().join("kaggle");
    let queries = spotted(&kaggle, 10, 2, 11);
    let dir = tmp.path().join("cat");
    let base = |extra: &[&str]| {
        let mut args = vec![
            "--catalog",
            dir.to_str().unwrap(),
            "--import",
            kaggle.to_str().unwrap(),
            "--zero-shot",
            "efficientnet_lite0",
            "--img-size",
            "128",
            "--local",
            "rootsift",
        ];
        args.extend_from_slice(extra);
        serve_args(&args)
    };
    let (cat, said) = open_catalog(&base(&[]), &ProgressBar::hidden()).unwrap();
    assert!(
        said.contains("extracted the local features of 20 photos"),
        "{said}"
    );
    // Without a calibration, the descriptors pass through a whitening fitted on the catalogue.
    assert!(
        said.contains(
            "whitened (--local-whitening 0.5) by a whitening fitted on 20 catalogue photos"
        ),
        "{said}"
    );
    let app = router(state(cat, 1_000_000));
    let (_, health) = get(&app, "/api/health").await;
    let model = health["model"].as_str().unwrap().to_string();
    let identify = |app: axum::Router, bytes: Vec<u8>| async move {
        let parts = [("photo", Some("query.png"), bytes.as_slice())];
        let (status, found) = call(&app, upload_req(&parts)).await;
        assert_eq!(status, StatusCode::OK, "{found}");
        found
    };
    let mut hits = 0;
    for (bytes, truth) in &queries {
        let found = identify(app.clone(), bytes.clone()).await;
        assert_eq!(found["ranked_by"], "local");
        let best = &found["candidates"][0];
        if best["individual_id"] == truth.as_str() {
            hits += 1;
            let matched = best["local"]["image"].as_str().unwrap();
            assert!(best["local"]["inliers"].as_u64().unwrap() >= 3, "{best}");
            assert_eq!(best["photos"][0]["image"], matched, "{best}");
            let path = format!(
                "/api/matches?query={}&photo={matched}",
                found["image"].as_str().unwrap()
            );
            let (status, m) = get(&app, &path).await;
            assert_eq!(status, StatusCode::OK, "{m}");
            assert!(m["verified"].as_u64().unwrap() > 0, "{m}");
        }
    }
    eprintln!(
        "local re-ranking: {hits} of {} spotted animals first",
        queries.len()
    );
    assert!(hits >= 9, "{hits} of {}", queries.len());
    drop(app);

    // A calibration for this model and these settings: the fused probability ranks and its
    // threshold decides; reopened, nothing is extracted again.
    let settings = LocalArgs {
        local: "rootsift".into(),
        ..Default::default()
    };
    let extraction = settings.extraction();
    let calibration = |model: &str| Calibration {
        model: model.to_string(),
        extraction: extraction.clone(),
        shortlist: 100,
        lnbnn_k: 4,
        score: Default::default(),
        identity_score: Default::default(),
        geometry: Default::default(),
        max_rotation: settings.local_max_rotation,
        position_weight: 0.0,
        whitening_power: 0.0,
        whitening: None,
        fusion: Fusion {
            embedding: Logistic { a: 0.0, b: 0.0 },
            local: Logistic { a: 3.0, b: -6.0 },
            embedding_weight: 0.5,
        },
        threshold: 0.4,
        photos: 20,
        map5: 1.0,
    };
    let file = tmp.path().join("calibration.json");
    calibration(&model).save(&file).unwrap();
    let args = base(&[
        "--calibration",
        file.to_str().unwrap(),
        "--local-whitening",
        "0",
    ]);
    let (cat, said) = open_catalog(&args, &ProgressBar::hidden()).unwrap();
    assert!(
        said.contains("extracted the local features of 0 photos") && !said.contains("whitened"),
        "{said}"
    );
    let app = router(state(cat, 1_000_000));
    let found = identify(app.clone(), queries[0].0.clone()).await;
    assert_eq!(found["ranked_by"], "fused");
    assert_eq!(found["threshold"].as_f64().unwrap() as f32, 0.4);
    assert_eq!(
        found["candidates"][0]["individual_id"],
        queries[0].1.as_str()
    );
    let p = found["candidates"][0]["score"].as_f64().unwrap();
    assert!(
        p > 0.4 && p < 1.0 && found["new_individual"] == false,
        "{found}"
    );
    drop(app);

    // A calibration with a whitening that only permutes and negates the descriptors' axes
    // (mean 0): distances are kept, so the same candidates with the same scores, which holds
    // only if the upload and every catalogue photo pass through it alike.
    let dim = 128;
    let mut proj = vec![0.0f32; dim * dim];
    for i in 0..dim {
        proj[i * dim + (i * 37 + 5) % dim] = if i % 3 == 0 { -1.0 } else { 1.0 };
    }
    let rotated = Calibration {
        whitening_power: 0.5,
        whitening: Some(Whitening {
            mean: vec![0.0; dim],
            proj,
            dim_in: dim,
            dim_out: dim,
        }),
        ..calibration(&model)
    };
    let rotated_file = tmp.path().join("rotated.json");
    rotated.save(&rotated_file).unwrap();
    let args = base(&[
        "--calibration",
        rotated_file.to_str().unwrap(),
        "--local-whitening",
        "0.5",
    ]);
    let (cat, _) = open_catalog(&args, &ProgressBar::hidden()).unwrap();
    let app = router(state(cat, 1_000_000));
    let again = identify(app.clone(), queries[0].0.clone()).await;
    let scored = |f: &Value| -> Vec<(String, f64)> {
        f["candidates"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| (c["individual_id"].to_string(), c["score"].as_f64().unwrap()))
            .collect()
    };
    let (before, after) = (scored(&found), scored(&again));
    assert_eq!(before.len(), after.len(), "{found}\n{again}");
    for ((id, p), (id2, p2)) in before.iter().zip(&after) {
        assert!(id == id2 && (p - p2).abs() < 1e-4, "{found}\n{again}");
    }
    drop(app);
    let err = open_catalog(
        &base(&["--calibration", file.to_str().unwrap()]),
        &ProgressBar::hidden(),
    )
    .err()
    .unwrap();
    assert!(
        format!("{err:#}").contains("fitted for --local-whitening 0, not 0.5"),
        "{err:#}"
    );

    let other = tmp.path().join("other-model.json");
    calibration("zero-shot:resnet50").save(&other).unwrap();
    let args = base(&["--calibration", other.to_str().unwrap()]);
    let err = open_catalog(&args, &ProgressBar::hidden()).err().unwrap();
    assert!(format!("{err:#}").contains("other-model.json"), "{err:#}");
    let args = serve_args(&[
        "--catalog",
        dir.to_str().unwrap(),
        "--zero-shot",
        "efficientnet_lite0",
        "--calibration",
        "c.json",
    ]);
    let err = open_catalog(&args, &ProgressBar::hidden()).err().unwrap();
    assert!(format!("{err:#}").contains("--local"), "{err:#}");
}
