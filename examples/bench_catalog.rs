//! Writes a catalogue of `--n` confirmed photos with synthetic embeddings, for measuring a real
//! `finprint serve` over it (`tools/bench.py` starts the service on it, identifies one photo and
//! reads the service's peak memory).
//!
//! The embeddings are those of `bench_knn`'s synthetic catalogue (`common::catalogue`: species,
//! individuals with a heavy-tailed number of photos, photos as noisy copies of their individual),
//! of the dimension of `--models`, and stored under that model's identity
//! (`ModelSpec::identity`), so that `finprint serve --models` with the same run finds every photo
//! embedded and embeds none again. No photo file is written: identification needs only the
//! embeddings. Rows go in through one transaction without a journal (the folder is new).
//!
//!   cargo run --release --example bench_catalog -- --catalog DIR --models RUN [--n 1000000]
//!
//! Prints one JSON line: photos, individuals, the embedding dimension, seconds taken and the
//! size of the catalogue file.

mod common;

use anyhow::Context;
use clap::Parser;
use common::catalogue;
use finprint::catalog::{to_blob, Catalog};
use finprint::network::Engine;
use finprint::runs::ModelSpec;
use rusqlite::{params, Connection};
use serde_json::json;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Parser)]
struct Args {
    /// The catalogue folder to create; must not exist yet.
    #[arg(long)]
    catalog: PathBuf,
    /// The trained run whose identity and embedding size the embeddings get.
    #[arg(long)]
    models: PathBuf,
    /// Confirmed photos.
    #[arg(long, default_value_t = 1_000_000)]
    n: usize,
    #[arg(long, default_value_t = 7)]
    seed: u64,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        !args.catalog.exists(),
        "{} exists: bench_catalog writes a new catalogue",
        args.catalog.display()
    );
    let start = Instant::now();
    let spec = ModelSpec::Runs(vec![args.models.clone()], Engine::default());
    let model = spec.identity()?;
    let dim = spec.load(None)?.dim();
    drop(Catalog::open(&args.catalog)?);
    let cat = catalogue(args.n, dim, args.seed);

    let path = args.catalog.join("catalog.sqlite");
    let mut conn =
        Connection::open(&path).with_context(|| format!("cannot open {}", path.display()))?;
    conn.pragma_update(None, "journal_mode", "OFF")?;
    conn.pragma_update(None, "synchronous", "OFF")?;
    let tx = conn.transaction()?;
    {
        let mut individual = tx.prepare(
            "INSERT INTO individuals (id, species, created_at, created_by)
             VALUES (?1, 'synthetic', '2026-01-01T00:00:00.000Z', 'bench')",
        )?;
        for i in 0..cat.individuals() {
            individual.execute([format!("ind{i:07}")])?;
        }
        let mut photo = tx.prepare(
            "INSERT INTO photos (image, individual_id, species, added_at)
             VALUES (?1, ?2, 'synthetic', '2026-01-01T00:00:00.000Z')",
        )?;
        let mut embedding =
            tx.prepare("INSERT INTO embeddings (image, model, vector) VALUES (?1, ?2, ?3)")?;
        for (row, (v, label)) in cat.photos.chunks_exact(dim).zip(&cat.labels).enumerate() {
            let image = format!("p{row:07}.jpg");
            photo.execute(params![image, format!("ind{label:07}")])?;
            embedding.execute(params![image, model, to_blob(v)])?;
        }
    }
    tx.commit()?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    drop(conn);
    let bytes = std::fs::metadata(&path)?.len();
    println!(
        "{}",
        json!({
            "photos": args.n, "individuals": cat.individuals(), "dim": dim, "model": model,
            "seconds": start.elapsed().as_secs_f64(), "sqlite_mb": bytes as f64 / 1e6,
        })
    );
    Ok(())
}
