//! `finprint report RUN`: the loss and MAP@5 curves of a run as PNG, and a Markdown summary.

use super::config::TrainConfig;
use crate::fsio;
use crate::runs::{EpochMetrics, RunDir};
use anyhow::{Context, Result};
use plotters::prelude::*;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Once;

/// The files a report writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportFiles {
    pub loss_png: PathBuf,
    pub map_png: PathBuf,
    pub markdown: PathBuf,
}

impl std::fmt::Display for ReportFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "wrote {}, {} and {}",
            self.markdown.display(),
            self.map_png.display(),
            self.loss_png.display()
        )
    }
}

/// Plots need a font; the DejaVu font ships inside the binary.
fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = plotters::style::register_font(
            "sans-serif",
            FontStyle::Normal,
            dejavu::sans::regular(),
        );
    });
}

/// One curve of (x, y) points.
pub struct Curve<'a> {
    pub label: &'a str,
    pub points: Vec<(f64, f64)>,
    pub color: RGBColor,
}

/// Draw `curves` (lines through dots, with a legend) into the PNG `path`; the x axis starts at 0.
pub fn plot(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    curves: &[Curve],
) -> Result<()> {
    register_font();
    let all: Vec<(f64, f64)> = curves
        .iter()
        .flat_map(|c| c.points.iter().copied())
        .collect();
    let x_max = all.iter().map(|p| p.0).fold(1.0, f64::max);
    let (lo, hi) = all
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), p| {
            (lo.min(p.1), hi.max(p.1))
        });
    let (lo, hi) = if lo.is_finite() { (lo, hi) } else { (0.0, 1.0) };
    let pad = ((hi - lo) * 0.1).max(1e-3);
    let tmp = path.with_extension("tmp.png");
    {
        let root = BitMapBackend::new(&tmp, (720, 440)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..x_max, (lo - pad)..(hi + pad))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        chart
            .configure_mesh()
            .x_desc(x_label)
            .y_desc(y_label)
            .draw()
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        for c in curves {
            let color = c.color;
            chart
                .draw_series(LineSeries::new(
                    c.points.iter().copied(),
                    color.stroke_width(2),
                ))
                .map_err(|e| anyhow::anyhow!("{e}"))?
                .label(c.label)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
                });
            chart
                .draw_series(c.points.iter().map(|&p| Circle::new(p, 3, color.filled())))
                .map_err(|e| anyhow::anyhow!("{e}"))?;
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        root.present()
            .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", tmp.display()))?;
    }
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))
}

/// Draw the curves of the run in `run` and write `report.md` beside them.
pub fn report(run: &Path) -> Result<ReportFiles> {
    let dir = RunDir::new(run);
    let metrics = dir.read_metrics()?;
    let config: TrainConfig = dir.read_config()?;
    let summary = dir.read_summary().ok().flatten();
    let files = ReportFiles {
        loss_png: run.join("loss.png"),
        map_png: run.join("map5.png"),
        markdown: run.join("report.md"),
    };
    let trained: Vec<&EpochMetrics> = metrics.iter().filter(|m| m.epoch > 0).collect();
    let loss: Vec<(f64, f64)> = trained
        .iter()
        .filter_map(|m| Some((m.epoch as f64, m.train_loss?)))
        .collect();
    plot(
        &files.loss_png,
        "training loss (ArcFace cross-entropy)",
        "epoch",
        "loss",
        &[Curve {
            label: "train loss",
            points: loss,
            color: RED,
        }],
    )?;
    let map: Vec<(f64, f64)> = trained
        .iter()
        .filter_map(|m| Some((m.epoch as f64, m.val_map5?)))
        .collect();
    let mut curves = vec![Curve {
        label: "validation MAP@5",
        points: map,
        color: BLUE,
    }];
    let zero_shot = metrics
        .iter()
        .find(|m| m.epoch == 0)
        .and_then(|m| m.val_map5);
    if let Some(z) = zero_shot {
        let last = trained.last().map_or(1.0, |m| m.epoch as f64);
        curves.push(Curve {
            label: "zero-shot (pretrained features)",
            points: vec![(0.0, z), (last, z)],
            color: RGBColor(120, 120, 120),
        });
    }
    plot(
        &files.map_png,
        "held-out MAP@5 (fold with unseen individuals)",
        "epoch",
        "MAP@5",
        &curves,
    )?;

    let mut md = String::new();
    writeln!(md, "# Training run `{}`\n", run.display())?;
    if config.mode == super::Mode::Frozen {
        let whitening = std::fs::read(run.join("best").join(crate::runs::MEMBERS_FILE))
            .ok()
            .and_then(|b| serde_json::from_slice::<crate::runs::Frozen>(&b).ok())
            .map_or(String::new(), |f| {
                format!(" (shrinkage {}, {} dimensions)", f.shrink, f.dim)
            });
        writeln!(
            md,
            "{} on `{}`, fold {} of {}, Frozen mode: the pretrained backbones' GeM features, concatenated and whitened{whitening}; epoch 1 is the whitening.\n",
            config.model,
            config.data,
            config.fold,
            config.folds,
        )?;
    } else {
        writeln!(
        md,
        "{} on `{}`, fold {} of {}, {:?} mode, {} epochs, input {} px, batch {}, lr {} (heads ×{}).\n",
        config.model,
        config.data,
        config.fold,
        config.folds,
        config.mode,
        config.epochs,
        config.img_size.map_or("default".to_string(), |s| s.to_string()),
        config.batch_size,
        config.lr,
        config.head_lr_mult
    )?;
    }
    if let Some(s) = &summary {
        writeln!(
            md,
            "Best validation MAP@5 **{:.4}** at epoch {} (zero-shot {}); {}; new_individual threshold {:.3}; {} training and {} validation photos, {} individuals trained on; {:.0} s.\n",
            s.best_map5,
            s.best_epoch,
            s.zero_shot_map5.map_or("-".to_string(), |z| format!("{z:.4}")),
            s.kept(),
            s.threshold,
            s.train_images,
            s.val_images,
            s.classes,
            s.seconds
        )?;
    }
    writeln!(md, "![MAP@5](map5.png)\n\n![loss](loss.png)\n")?;
    writeln!(md, "| epoch | train loss | lr | val MAP@5 | threshold | species accuracy | img/s | s |\n|---|---|---|---|---|---|---|---|")?;
    let f = |v: Option<f64>, p: usize| v.map_or("-".to_string(), |v| format!("{v:.p$}"));
    for m in &metrics {
        writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {:.1} |",
            if m.epoch == 0 {
                "0 (zero-shot)".to_string()
            } else {
                m.epoch.to_string()
            },
            f(m.train_loss, 4),
            m.lr.map_or("-".to_string(), |v| format!("{v:.2e}")),
            f(m.val_map5, 4),
            f(m.threshold.map(f64::from), 3),
            f(m.val_species_accuracy, 3),
            f(m.images_per_s, 1),
            m.seconds
        )?;
    }
    fsio::write_bytes_atomic(&files.markdown, md.as_bytes())?;
    Ok(files)
}
