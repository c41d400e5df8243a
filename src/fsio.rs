//! File output that never leaves a half-written file behind: write a temporary file beside
//! the target, then rename it over the target.

use anyhow::{Context, Result};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// The temporary path used while `path` is being written: unique to this write (process and
/// a counter), so threads writing the same target never share one.
pub fn temp_path(path: &Path) -> PathBuf {
    static WRITES: AtomicU64 = AtomicU64::new(0);
    let n = WRITES.fetch_add(1, Ordering::Relaxed);
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".{}-{n}.tmp", std::process::id()));
    path.with_file_name(name)
}

/// Write `path` atomically: `fill` writes the content into a buffered temporary file, which
/// replaces `path` only once it has been written and flushed completely.
pub fn write_atomic<F>(path: &Path, fill: F) -> Result<()>
where
    F: FnOnce(&mut BufWriter<File>) -> Result<()>,
{
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create folder {}", parent.display()))?;
    }
    let tmp = temp_path(path);
    let result = (|| -> Result<()> {
        let file =
            File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
        let mut out = BufWriter::new(file);
        fill(&mut out)?;
        let file = out
            .into_inner()
            .map_err(|e| e.into_error())
            .with_context(|| format!("cannot write {}", path.display()))?;
        file.sync_all()
            .with_context(|| format!("cannot write {}", path.display()))?;
        std::fs::rename(&tmp, path)
            .with_context(|| format!("cannot move {} to {}", tmp.display(), path.display()))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Remove the temporary files that writes into `dir` left when their process was killed
/// (`NAME.PID-N.tmp`, PID no longer running); other files are never touched. Returns how many
/// were removed.
pub fn remove_orphan_temps(dir: &Path) -> Result<usize> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e).with_context(|| format!("cannot list {}", dir.display())),
    };
    let mut removed = 0;
    for entry in entries {
        let entry = entry.with_context(|| format!("cannot list {}", dir.display()))?;
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(temp_writer) else {
            continue;
        };
        if pid == std::process::id() || process_runs(pid) || !entry.path().is_file() {
            continue;
        }
        std::fs::remove_file(entry.path())
            .with_context(|| format!("cannot remove {}", entry.path().display()))?;
        removed += 1;
    }
    Ok(removed)
}

/// The process id in a temporary name of [`temp_path`]'s pattern.
fn temp_writer(name: &str) -> Option<u32> {
    let stem = name.strip_suffix(".tmp")?;
    let (rest, counter) = stem.rsplit_once('-')?;
    let (target, pid) = rest.rsplit_once('.')?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    (!target.is_empty() && digits(counter) && digits(pid))
        .then(|| pid.parse().ok())
        .flatten()
}

/// Whether process `pid` is running; where that cannot be known (no `/proc`), it is assumed
/// to be, and nothing is removed.
fn process_runs(pid: u32) -> bool {
    !Path::new("/proc/self").exists() || Path::new(&format!("/proc/{pid}")).exists()
}

/// Write `bytes` to `path` atomically.
pub fn write_bytes_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic(path, |out| {
        out.write_all(bytes)
            .with_context(|| format!("cannot write {}", path.display()))
    })
}

/// FNV-1a, 64 bits: a stable fingerprint of bytes (std's hasher may change between releases).
pub fn fnv1a(bytes: &[u8], seed: u64) -> u64 {
    bytes.iter().fold(seed ^ 0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// f32 tensors `(name, shape, values)` as the bytes of a safetensors file with `metadata`.
pub fn f32_safetensors(
    tensors: &[(&str, Vec<usize>, &[f32])],
    metadata: Option<std::collections::HashMap<String, String>>,
) -> Result<Vec<u8>> {
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, _, v)| v.iter().flat_map(|x| x.to_le_bytes()).collect())
        .collect();
    let views = tensors
        .iter()
        .zip(&bytes)
        .map(|((name, shape, _), b)| {
            let view =
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), b)
                    .with_context(|| format!("tensor '{name}'"))?;
            Ok((*name, view))
        })
        .collect::<Result<Vec<_>>>()?;
    safetensors::serialize(views, &metadata).context("serialising tensors")
}

/// The shape and values of the f32 tensor `name` of a safetensors file (`path` names it in
/// errors).
pub fn read_f32(
    file: &safetensors::SafeTensors,
    name: &str,
    path: &Path,
) -> Result<(Vec<usize>, Vec<f32>)> {
    let t = file
        .tensor(name)
        .with_context(|| format!("{}: no '{name}' tensor", path.display()))?;
    anyhow::ensure!(
        t.dtype() == safetensors::Dtype::F32,
        "{}: '{name}' is {:?}, not f32",
        path.display(),
        t.dtype()
    );
    let values = t
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    Ok((t.shape().to_vec(), values))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn racing_writes_of_one_target_never_share_a_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("same.bin");
        std::thread::scope(|scope| {
            for t in 0..16u8 {
                let target = &target;
                scope.spawn(move || {
                    for _ in 0..20 {
                        write_bytes_atomic(target, &[t; 4096]).unwrap();
                    }
                });
            }
        });
        let bytes = std::fs::read(&target).unwrap();
        assert!(bytes.len() == 4096 && bytes.iter().all(|&b| b == bytes[0]));
        let left = std::fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(left, 1, "no temporary file left behind");
    }

    #[test]
    fn only_temporaries_of_dead_writers_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let own = format!("b.jpg.{}-3.tmp", std::process::id());
        let names = [
            "a.jpg.4294967295-7.tmp",
            own.as_str(),
            "notes.tmp",
            "c.jpg.12-x.tmp",
            ".4294967295-1.tmp",
            "a.jpg",
        ];
        for n in names {
            std::fs::write(dir.path().join(n), b"x").unwrap();
        }
        assert_eq!(remove_orphan_temps(dir.path()).unwrap(), 1);
        for n in &names[1..] {
            assert!(dir.path().join(n).is_file(), "{n} was removed");
        }
        assert_eq!(remove_orphan_temps(&dir.path().join("absent")).unwrap(), 0);
    }

    #[test]
    fn fnv1a_matches_its_published_values() {
        // FNV-1a 64 test vectors: "" and "a".
        assert_eq!(fnv1a(b"", 0), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a", 0), 0xaf63_dc4c_8601_ec8c);
    }

    #[test]
    fn failed_write_keeps_the_old_file_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.csv");
        write_bytes_atomic(&path, b"old").unwrap();
        let err = write_atomic(&path, |out| {
            out.write_all(b"half")?;
            anyhow::bail!("interrupted")
        });
        assert!(err.is_err());
        assert_eq!(std::fs::read(&path).unwrap(), b"old");
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "temporary file left behind");
    }

    #[test]
    fn write_creates_missing_folders() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x/y/z.txt");
        write_bytes_atomic(&path, b"hi").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"hi");
    }
}
