//! Draws the plots of a bench run with the crate's own plotting (`train::report::plot`), from
//! the `plots` entry of the results JSON that `tools/bench.py` writes:
//! `{"NAME": {"file", "title", "x_label", "y_label", "curves": [{"label", "points": [[x, y]]}]}}`.
//!
//!   cargo run --release --example bench_plots -- bench/results.json bench/

use anyhow::Context;
use finprint::train::report::{plot, Curve};
use plotters::style::RGBColor;
use serde_json::Value;
use std::path::PathBuf;

const PALETTE: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(120, 120, 120),
];

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let (Some(results), Some(out)) = (args.next(), args.next()) else {
        anyhow::bail!("usage: bench_plots RESULTS.json OUT_DIR");
    };
    let (results, out) = (PathBuf::from(results), PathBuf::from(out));
    let text = std::fs::read_to_string(&results)
        .with_context(|| format!("cannot read {}", results.display()))?;
    let value: Value =
        serde_json::from_str(&text).with_context(|| format!("{}: not JSON", results.display()))?;
    let plots = value["plots"]
        .as_object()
        .with_context(|| format!("{}: no plots", results.display()))?;
    for (name, p) in plots {
        let s = |key: &str| p[key].as_str().unwrap_or("");
        let curves: Vec<Curve> = p["curves"]
            .as_array()
            .into_iter()
            .flatten()
            .zip(PALETTE.iter().cycle())
            .map(|(c, &color)| Curve {
                label: c["label"].as_str().unwrap_or(""),
                points: c["points"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|xy| Some((xy[0].as_f64()?, xy[1].as_f64()?)))
                    .collect(),
                color,
            })
            .filter(|c| !c.points.is_empty())
            .collect();
        if curves.is_empty() {
            continue;
        }
        let path = out.join(s("file"));
        plot(&path, s("title"), s("x_label"), s("y_label"), &curves)
            .with_context(|| format!("plot {name}"))?;
        println!("{}", path.display());
    }
    Ok(())
}
