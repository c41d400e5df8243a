//! Running a written network with onnxruntime, whose shared library (the one the PyPI
//! `onnxruntime` wheel carries) is opened at run time: from `ORT_DYLIB_PATH` when set, else the
//! folder `tools/setup.sh` links at `.venv/onnxruntime`, as this build recorded it.

use super::NetShape;
use anyhow::{bail, ensure, Context, Result};
use ort::session::{builder::GraphOptimizationLevel, Session};
use ort::value::TensorRef;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

/// The environment variable that names onnxruntime's library (`ort`'s own).
pub const LIBRARY_VAR: &str = "ORT_DYLIB_PATH";

/// The oldest onnxruntime whose C API serves what `ort` asks for (API 22).
const OLDEST_MINOR: u32 = 22;

/// Opens onnxruntime's library and sets up `ort`'s environment on it, once per process: later
/// calls give the first one's answer.
fn library() -> Result<()> {
    static OPENED: OnceLock<Result<(), String>> = OnceLock::new();
    let opened = OPENED.get_or_init(|| {
        let path = locate().map_err(|e| format!("{e:#}"))?;
        check(&path).map_err(|e| format!("{e:#}"))?;
        environment(&path).map_err(|e| format!("onnxruntime at {}: {e}", path.display()))
    });
    opened.clone().map_err(|e| anyhow::anyhow!(e))
}

/// `ort`'s environment on the library at `path` (`ort` opens it by this path from now on; it
/// panics where it cannot, which [`check`] rules out), with one pool of
/// [`crate::runtime::threads`] threads that every session shares: the networks of an ensemble
/// run one after the other, and pools of their own would each keep a thread spinning beside
/// the network that works.
fn environment(path: &Path) -> ort::Result<()> {
    let builder = ort::init_from(path.display().to_string());
    let pool = ort::environment::GlobalThreadPoolOptions::default()
        .with_intra_threads(crate::runtime::threads())?
        .with_inter_threads(1)?;
    builder.with_global_thread_pool(pool).commit()?;
    Ok(())
}

/// `ORT_DYLIB_PATH`, else the `libonnxruntime.so*` in the folder this build was told of.
fn locate() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os(LIBRARY_VAR).filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(path));
    }
    let hint = "install the onnxruntime wheel with `bash tools/setup.sh`, or name its \
                libonnxruntime.so in ORT_DYLIB_PATH";
    let Some(dir) = option_env!("FINPRINT_ONNXRUNTIME_DIR") else {
        bail!("no onnxruntime library known to this build: {hint}");
    };
    let entries = std::fs::read_dir(dir)
        .with_context(|| format!("no onnxruntime library at {dir}: {hint}"))?;
    let mut libs: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libonnxruntime.so"))
        })
        .collect();
    libs.sort();
    libs.pop()
        .with_context(|| format!("{dir} holds no libonnxruntime.so: {hint}"))
}

/// Opens `path` and reads its version, so that a missing, foreign or too old library is an
/// error naming it rather than a panic inside `ort`.
fn check(path: &Path) -> Result<()> {
    let what = || format!("onnxruntime library {}", path.display());
    // SAFETY: loading runs the library's initialisers; onnxruntime's only set up its globals.
    let lib = unsafe { libloading::Library::new(path) }.with_context(what)?;
    // SAFETY: `OrtGetApiBase` has this signature in every onnxruntime.
    let base = unsafe {
        lib.get::<unsafe extern "C" fn() -> *const ort::sys::OrtApiBase>(b"OrtGetApiBase")
    }
    .with_context(|| format!("{} is not onnxruntime", what()))?;
    // SAFETY: the base and its version string are static in the library, which stays loaded.
    let version = unsafe {
        let base = base();
        ensure!(!base.is_null(), "{} gives no API", what());
        std::ffi::CStr::from_ptr(((*base).GetVersionString)()).to_string_lossy()
    };
    let minor = version
        .split('.')
        .nth(1)
        .and_then(|m| m.parse::<u32>().ok());
    ensure!(
        minor.is_some_and(|m| m >= OLDEST_MINOR),
        "{} is version {version}: finprint needs 1.{OLDEST_MINOR} or later",
        what()
    );
    // Stays loaded for the process, as `ort` opens it again.
    std::mem::forget(lib);
    Ok(())
}

/// A network of one input `[N, C, H, W]` (any N) and one output `[N, D]`, in an onnxruntime
/// session with every graph optimisation (convolutions fused with their activations), on the
/// process's pool of threads (sized by [`crate::runtime::threads`] when the first is made).
pub struct OrtNet {
    /// `ort` runs a session through `&mut`: one batch at a time.
    session: Mutex<Session>,
    shape: NetShape,
}

impl OrtNet {
    /// A session of the ONNX model in `bytes` (`what` names it in errors).
    pub fn new(bytes: &[u8], what: &str) -> Result<Self> {
        library()?;
        let session = Session::builder()
            .and_then(|b| b.with_optimization_level(GraphOptimizationLevel::Level3))
            .and_then(|b| b.commit_from_memory(bytes))
            .map_err(|e| anyhow::anyhow!("{e}"))
            .with_context(|| format!("{what}: onnxruntime cannot load the network"))?;
        let shape = |t: &ort::value::ValueType| t.tensor_shape().map(|s| s.to_vec());
        let (input, output) = match (&session.inputs[..], &session.outputs[..]) {
            ([i], [o]) => (shape(&i.input_type), shape(&o.output_type)),
            _ => bail!("{what}: not a network of one input and one output"),
        };
        let chw = match input.as_deref() {
            Some(&[_, c, h, w]) if c > 0 && h > 0 && w > 0 => [c as usize, h as usize, w as usize],
            _ => bail!("{what}: the input is not [N, C, H, W] with fixed C, H, W"),
        };
        let dim = match output.as_deref() {
            Some(&[_, d]) if d > 0 => d as usize,
            other => bail!("{what}: the output has shape {other:?}, not [N, D]"),
        };
        Ok(Self {
            session: Mutex::new(session),
            shape: NetShape { chw, dim },
        })
    }

    pub fn shape(&self) -> NetShape {
        self.shape
    }

    /// Rows `[n, D]` of `n` inputs laid out `[n, C, H, W]`.
    pub fn run(&self, inputs: &[f32], n: usize) -> Result<Vec<f32>> {
        self.shape.image_len(inputs, n)?;
        if n == 0 {
            return Ok(Vec::new());
        }
        let [c, h, w] = self.shape.chw;
        let input = TensorRef::from_array_view(([n, c, h, w], inputs))
            .map_err(|e| anyhow::anyhow!("input tensor: {e}"))?;
        let mut session = self.session.lock().expect("no panic while held");
        let outputs = session
            .run(ort::inputs![input])
            .map_err(|e| anyhow::anyhow!("onnxruntime: {e}"))?;
        let (shape, rows) = outputs[0]
            .try_extract_tensor::<f32>()
            .map_err(|e| anyhow::anyhow!("onnxruntime's output: {e}"))?;
        ensure!(
            shape[..] == [n as i64, self.shape.dim as i64],
            "onnxruntime gave {shape:?} for {n} images"
        );
        Ok(rows.to_vec())
    }
}
