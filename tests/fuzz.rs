//! Bounded fuzzing, deterministic and fast enough for every CI run: thousands of mutations
//! (byte flips, overwrites, truncations, insertions, repeated spans) of valid photos and CSVs,
//! seeded, fed to the decoder and the CSV readers. Each must answer `Ok` or a clean `Err`,
//! never panic.

use finprint::data::image::decode_rgb_within;
use finprint::data::{read_solution, read_submission, read_train_csv};
use image::ImageEncoder;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::{Duration, Instant};

/// One random change of `bytes`.
fn mutate(rng: &mut ChaCha8Rng, bytes: &mut Vec<u8>) {
    if bytes.is_empty() {
        bytes.push(rng.gen());
        return;
    }
    let at = rng.gen_range(0..bytes.len());
    match rng.gen_range(0..6) {
        0 => bytes[at] ^= 1 << rng.gen_range(0..8),
        1 => bytes[at] = rng.gen(),
        2 => bytes.truncate(at),
        3 => bytes.insert(at, rng.gen()),
        4 => {
            let end = (at + rng.gen_range(1..64)).min(bytes.len());
            let span = bytes[at..end].to_vec();
            let to = rng.gen_range(0..bytes.len());
            bytes.splice(to..to, span);
        }
        _ => {
            let end = (at + rng.gen_range(1..32)).min(bytes.len());
            bytes.drain(at..end);
        }
    }
}

/// `count` mutants of each seed (1 to 4 changes each), given to `check`; a panic fails the
/// test naming the seed and mutant, so that it can be replayed.
fn fuzz(seeds: &[Vec<u8>], count: usize, mut check: impl FnMut(&[u8])) {
    let mut rng = ChaCha8Rng::seed_from_u64(18);
    for (s, seed) in seeds.iter().enumerate() {
        for m in 0..count {
            let mut bytes = seed.clone();
            for _ in 0..rng.gen_range(1..=4) {
                mutate(&mut rng, &mut bytes);
            }
            let result = catch_unwind(AssertUnwindSafe(|| check(&bytes)));
            assert!(result.is_ok(), "seed {s}, mutant {m} panicked");
        }
    }
}

fn jpeg(setup: impl FnOnce(&mut jpeg_encoder::Encoder<&mut Vec<u8>>)) -> Vec<u8> {
    let rgb: Vec<u8> = (0..48 * 32)
        .flat_map(|i: u32| [(i % 48 * 5) as u8, (i / 48 * 7) as u8, (i % 13) as u8])
        .collect();
    let mut bytes = Vec::new();
    let mut enc = jpeg_encoder::Encoder::new(&mut bytes, 80);
    setup(&mut enc);
    enc.encode(&rgb, 48, 32, jpeg_encoder::ColorType::Rgb)
        .unwrap();
    bytes
}

fn png(color: image::ExtendedColorType, channels: usize) -> Vec<u8> {
    let data: Vec<u8> = (0..40 * 30 * channels)
        .map(|i| (i * 7 % 251) as u8)
        .collect();
    let mut out = Vec::new();
    image::codecs::png::PngEncoder::new(&mut out)
        .write_image(&data, 40, 30, color)
        .unwrap();
    out
}

#[test]
fn the_decoder_survives_mutated_photos() {
    let seeds = vec![
        jpeg(|_| {}),
        jpeg(|e| e.set_progressive(true)),
        jpeg(|e| {
            e.set_sampling_factor(jpeg_encoder::SamplingFactor::F_2_2);
            e.set_restart_interval(2);
        }),
        png(image::ExtendedColorType::Rgb8, 3),
        png(image::ExtendedColorType::Rgba16, 8),
    ];
    for s in &seeds {
        assert!(decode_rgb_within(s, 1_000_000).is_ok());
    }
    let started = Instant::now();
    let (mut ok, mut refused) = (0, 0);
    fuzz(&seeds, 2000, |bytes| {
        // A small pixel limit: a mutated header never makes the decoder allocate much.
        match decode_rgb_within(bytes, 1_000_000) {
            Ok(_) => ok += 1,
            Err(e) => {
                assert!(!e.is_empty());
                refused += 1;
            }
        }
    });
    eprintln!("{ok} decoded, {refused} refused in {:?}", started.elapsed());
    assert!(
        refused > ok,
        "most mutants are refused: {ok} decoded, {refused} refused"
    );
    assert!(started.elapsed() < Duration::from_secs(60));
}

#[test]
fn the_csv_readers_survive_mutated_files() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("in.csv");
    let seeds =
        vec![
        b"image,species,individual_id\na.jpg,beluga,w1\nb.jpg,\"blue whale\",w2\nc.jpg,beluga,w1\n"
            .to_vec(),
        b"image,predictions\na.jpg,w1 w2 new_individual w3 w4\nb.jpg,w2\n".to_vec(),
        b"image,individual_id\na.jpg,w1\nb.jpg,new_individual\n".to_vec(),
        "image,species,individual_id\r\n\u{feff}é.jpg,orca,\"x,y\"\r\n".as_bytes().to_vec(),
    ];
    let started = Instant::now();
    let mut refused = 0;
    fuzz(&seeds, 300, |bytes| {
        std::fs::write(&path, bytes).unwrap();
        refused += usize::from(read_train_csv(&path).is_err());
        refused += usize::from(read_submission(&path).is_err());
        refused += usize::from(read_solution(&path).is_err());
    });
    eprintln!("{refused} refusals in {:?}", started.elapsed());
    assert!(refused > 0);
    assert!(started.elapsed() < Duration::from_secs(60));
}
