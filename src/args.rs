//! Plumbing for the commands' typed argument structs: an options struct that is both the clap
//! arguments and the serde config takes its defaults from its clap attributes alone
//! ([`defaults_of`]), and a JSON config file is overridden by the flags given on the command
//! line ([`merge_flags`]); plus the progress bar every command shows.

use anyhow::{Context, Result};
use clap::parser::ValueSource;
use clap::{ArgMatches, Args, FromArgMatches};
use indicatif::{ProgressBar, ProgressStyle};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;
use std::path::Path;

/// The value of `T` when no flag is given: the defaults written in its clap attributes.
pub fn defaults_of<T: Args + FromArgMatches>() -> T {
    let cmd = T::augment_args(clap::Command::new("defaults").no_binary_name(true));
    let matches = cmd
        .try_get_matches_from(std::iter::empty::<String>())
        .expect("every option has a default");
    T::from_arg_matches(&matches).expect("the defaults parse")
}

/// `parsed` (the options as clap parsed them from `matches`) over the JSON config `file`: each
/// option given on the command line replaces the file's value. An argument's id is its path in
/// the JSON (`arcface.s` for `--arc-s`); ids that are no path of `T` (`--out`, `--config`) are
/// left alone. Keys missing from the file take `T`'s serde defaults.
pub fn merge_flags<T: Serialize + DeserializeOwned>(
    parsed: &T,
    matches: &ArgMatches,
    file: Option<&Path>,
) -> Result<T> {
    let Some(file) = file else {
        return Ok(serde_json::from_value(serde_json::to_value(parsed)?)?);
    };
    let text =
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    let mut merged: Value = serde_json::from_str(&text)
        .with_context(|| format!("{}: not a JSON config", file.display()))?;
    anyhow::ensure!(
        merged.is_object(),
        "{}: a config is a JSON object",
        file.display()
    );
    let flags = serde_json::to_value(parsed)?;
    for id in matches.ids() {
        if matches.value_source(id.as_str()) != Some(ValueSource::CommandLine) {
            continue;
        }
        let path: Vec<&str> = id.as_str().split('.').collect();
        let Some(value) = path.iter().try_fold(&flags, |v, key| v.get(key)) else {
            continue;
        };
        set_path(&mut merged, &path, value.clone());
    }
    serde_json::from_value(merged)
        .with_context(|| format!("{}: not a valid config", file.display()))
}

fn set_path(root: &mut Value, path: &[&str], value: Value) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut node = root;
    for key in parents {
        if !node.get(key).is_some_and(Value::is_object) {
            node[*key] = Value::Object(Default::default());
        }
        node = &mut node[*key];
    }
    node[*last] = value;
}

/// A progress bar on stderr: `what [=====>    ] done/total rate eta`.
pub fn bar(len: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(len).with_message(what.to_string());
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} {per_sec} eta {eta}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, Parser};
    use serde::Deserialize;

    #[derive(Clone, Debug, PartialEq, Serialize, Deserialize, clap::Args)]
    #[serde(default)]
    struct Inner {
        /// A nested option.
        #[arg(long = "inner-x", id = "inner.x", default_value_t = 1.5)]
        x: f64,
    }

    impl Default for Inner {
        fn default() -> Self {
            defaults_of()
        }
    }

    #[derive(Clone, Debug, PartialEq, Serialize, Deserialize, clap::Args)]
    #[serde(default)]
    struct Opts {
        /// Epochs.
        #[arg(long, default_value_t = 10)]
        epochs: usize,
        /// Rate.
        #[arg(long, default_value_t = 0.5)]
        lr: f64,
        #[command(flatten)]
        inner: Inner,
    }

    impl Default for Opts {
        fn default() -> Self {
            defaults_of()
        }
    }

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        opts: Opts,
        #[arg(long)]
        config: Option<std::path::PathBuf>,
    }

    fn parse(args: &[&str]) -> (Opts, ArgMatches) {
        let matches = Cli::command().get_matches_from(args);
        (Cli::from_arg_matches(&matches).unwrap().opts, matches)
    }

    #[test]
    fn defaults_come_from_the_clap_attributes() {
        let o = Opts::default();
        assert_eq!((o.epochs, o.lr, o.inner.x), (10, 0.5, 1.5));
    }

    #[test]
    fn flags_given_override_the_file_and_the_rest_keeps_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.json");
        std::fs::write(&file, r#"{"epochs": 3, "lr": 0.1, "inner": {"x": 7.0}}"#).unwrap();
        let (parsed, m) = parse(&["x", "--lr", "0.25", "--config", "c.json"]);
        let merged = merge_flags(&parsed, &m, Some(&file)).unwrap();
        assert_eq!((merged.epochs, merged.lr, merged.inner.x), (3, 0.25, 7.0));
        let (parsed, m) = parse(&["x", "--inner-x", "2"]);
        assert_eq!(merge_flags(&parsed, &m, Some(&file)).unwrap().inner.x, 2.0);
        // Keys missing from the file take the defaults, not the parsed flags' defaults by luck.
        std::fs::write(&file, r#"{"lr": 0.1}"#).unwrap();
        let (parsed, m) = parse(&["x"]);
        let merged = merge_flags(&parsed, &m, Some(&file)).unwrap();
        assert_eq!((merged.epochs, merged.lr, merged.inner.x), (10, 0.1, 1.5));
        let (parsed, m) = parse(&["x", "--epochs", "4"]);
        assert_eq!(merge_flags(&parsed, &m, None).unwrap().epochs, 4);
        std::fs::write(&file, "{").unwrap();
        let err = merge_flags(&parsed, &m, Some(&file)).unwrap_err();
        assert!(format!("{err:#}").contains("c.json"), "{err:#}");
    }
}
