//! A catalogue grown by pseudo-labels: test photos identified with confidence, written with the
//! catalogue's photos as a Kaggle folder that a second round of `train` takes.

use super::{read_train_csv, write_train_csv, KaggleDir, TrainRow};
use anyhow::{Context, Result};
use std::collections::{HashMap, HashSet};
use std::path::Path;

/// Write `out` in Kaggle's layout: `train.csv` with `data`'s rows and a row for each
/// `(test image, individual)` of `labels` (with the individual's species), `train_images/`
/// linking all those photos, and `test_images` linking `data`'s. Returns the rows added.
pub fn write_pseudo_labelled(
    data: &KaggleDir,
    labels: &[(String, String)],
    out: &Path,
) -> Result<usize> {
    let set = read_train_csv(&data.train_csv())?;
    let species: HashMap<&str, &str> = set
        .rows
        .iter()
        .map(|r| (r.individual_id.as_str(), r.species.as_str()))
        .collect();
    let known: HashSet<&str> = set.rows.iter().map(|r| r.image.as_str()).collect();
    let target = KaggleDir::new(out);
    anyhow::ensure!(
        std::path::absolute(out)? != std::path::absolute(&data.root)?,
        "--pseudo-labels {}: the catalogue's own folder; name a new one",
        out.display()
    );
    let images = target.train_images();
    std::fs::create_dir_all(&images)
        .with_context(|| format!("cannot create {}", images.display()))?;
    let mut rows = set.rows.clone();
    for (image, id) in labels {
        anyhow::ensure!(
            !known.contains(image.as_str()),
            "{}: test photo {image} has the name of a catalogue photo",
            data.test_images().display()
        );
        let species = species.get(id.as_str()).with_context(|| {
            format!("{id}: not an individual of {}", data.train_csv().display())
        })?;
        rows.push(TrainRow {
            image: image.clone(),
            species: species.to_string(),
            individual_id: id.clone(),
            encounter: None,
        });
    }
    let sources = set
        .rows
        .iter()
        .map(|r| data.train_images().join(&r.image))
        .chain(
            labels
                .iter()
                .map(|(image, _)| data.test_images().join(image)),
        );
    for (row, source) in rows.iter().zip(sources) {
        link(&source, &images.join(&row.image))?;
    }
    link(&data.test_images(), &target.test_images())?;
    write_train_csv(&target.train_csv(), &rows)?;
    Ok(labels.len())
}

/// `link` made a link to `source` (absolute), replacing what was there.
fn link(source: &Path, link: &Path) -> Result<()> {
    let source = std::path::absolute(source)?;
    if let Some(parent) = link.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    if link.symlink_metadata().is_ok() {
        std::fs::remove_file(link).with_context(|| format!("cannot replace {}", link.display()))?;
    }
    #[cfg(unix)]
    let made = std::os::unix::fs::symlink(&source, link);
    #[cfg(not(unix))]
    let made = std::fs::copy(&source, link).map(|_| ());
    made.with_context(|| format!("cannot link {} to {}", link.display(), source.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pseudo_labelled_photos_join_the_catalogue_with_their_species() {
        let tmp = tempfile::tempdir().unwrap();
        let data = KaggleDir::new(tmp.path().join("cat"));
        for dir in [data.train_images(), data.test_images()] {
            std::fs::create_dir_all(dir).unwrap();
        }
        std::fs::write(
            data.train_csv(),
            "image,species,individual_id\na.jpg,beluga,w1\nb.jpg,dolphin,d1\n",
        )
        .unwrap();
        for (dir, name) in [
            (data.train_images(), "a.jpg"),
            (data.train_images(), "b.jpg"),
            (data.test_images(), "t.jpg"),
        ] {
            std::fs::write(dir.join(name), name).unwrap();
        }
        let out = tmp.path().join("round2");
        let labels = [("t.jpg".to_string(), "d1".to_string())];
        assert_eq!(write_pseudo_labelled(&data, &labels, &out).unwrap(), 1);
        let grown = KaggleDir::new(&out);
        let rows = read_train_csv(&grown.train_csv()).unwrap().rows;
        let last = rows.last().unwrap();
        assert_eq!((rows.len(), last.species.as_str()), (3, "dolphin"));
        for (name, bytes) in [("a.jpg", "a.jpg"), ("t.jpg", "t.jpg")] {
            let read = std::fs::read_to_string(grown.train_images().join(name)).unwrap();
            assert_eq!(read, bytes);
        }
        assert!(grown.test_images().join("t.jpg").is_file());
        // Again, over what it wrote: the same folder.
        assert_eq!(write_pseudo_labelled(&data, &labels, &out).unwrap(), 1);

        let unknown = [("t.jpg".to_string(), "nobody".to_string())];
        let err = write_pseudo_labelled(&data, &unknown, &out).unwrap_err();
        assert!(err.to_string().contains("nobody"), "{err}");
        let clash = [("a.jpg".to_string(), "w1".to_string())];
        let err = write_pseudo_labelled(&data, &clash, &out).unwrap_err();
        assert!(err.to_string().contains("a.jpg"), "{err}");
        let err = write_pseudo_labelled(&data, &labels, &data.root).unwrap_err();
        assert!(err.to_string().contains("own folder"), "{err}");
    }
}
