//! finprint identifies individual whales and dolphins from photos of their fins.
//!
//! The pipeline flows one way through these modules; each uses only those above it:
//!
//! | stage | module | holds |
//! |---|---|---|
//! | plumbing | [`fsio`], [`runtime`], [`args`], [`linalg`] | atomic writes, fingerprints and f32 safetensors; device and threads; argument plumbing and progress bars; f32 matrix products |
//! | data | [`data`] | Kaggle CSVs, images, species names, folds, statistics |
//! | transforms | [`transforms`] | the photo as a network sees it: resize, normalise, batches |
//! | crops | [`crops`] | boxes, the saliency crop, the ONNX detector, crop sets |
//! | synthetic data | [`synth`] | a generated Kaggle-format catalogue of rendered fin photos |
//! | model | [`model`] | backbones (registry), GeM, neck, ArcFace, whitening; checkpoints |
//! | networks | [`network`] | a network as an engine runs it (libtorch, or onnxruntime or tract from ONNX), its heads as f32 classifiers |
//! | run folders | [`runs`] | config, metrics, checkpoints and state of a run; loading runs as an [`runs::Ensemble`] |
//! | embeddings | [`embed`] | photos (and their crops) to unit vectors, flip TTA, model fusion |
//! | search | [`search`] | the `Index` trait: exact (f32/f16) and HNSW, chosen by an [`search::IndexSpec`] |
//! | local features | [`local`] | RootSIFT keypoints, LNBNN votes and affine RANSAC: re-scoring a shortlist by the marks |
//! | scoring | [`metrics`] | MAP@5 as Kaggle defines it |
//! | decision | [`decide`] | candidates, where `new_individual` goes, thresholds chosen on validation |
//! | cross-validation | [`crossval`] | leave-one-out identification, bootstrap and paired bootstrap |
//! | fusion | [`fusion`] | local features of a photo set, shortlist re-scoring, the calibrated fusion |
//! | prediction | [`predict`] | ranking individuals, kNN + head (or local) fusion, submissions |
//! | evaluation | [`evaluate`] | `finprint evaluate`: the figures, intervals, gains and their costs |
//! | comparison | [`compare`] | `finprint compare`: per-query outcomes of cross-validation folds pooled, paired gains |
//! | training | [`train`] | augmentations, AdamW, the gradient and frozen modes, reports |
//! | demo | [`demo`] | the main job on the synthetic default |
//! | catalogue | [`catalog`] | individuals, photos, sightings and decisions in SQLite |
//! | service | [`service`] | the HTTP API and web page over a catalogue |
//!
//! `src/main.rs` is the command line: each command is a function of these modules taking its
//! typed arguments.

#[cfg(not(any(feature = "torch", feature = "onnx")))]
compile_error!(
    "finprint runs its networks with libtorch (feature `torch`) or tract (`onnx`): enable one"
);

pub mod args;
pub mod catalog;
pub mod compare;
pub mod crops;
pub mod crossval;
pub mod data;
pub mod decide;
#[cfg(feature = "torch")]
pub mod demo;
pub mod embed;
pub mod evaluate;
pub mod fsio;
pub mod fusion;
pub mod linalg;
pub mod local;
pub mod metrics;
pub mod model;
pub mod network;
pub mod onnx;
pub mod predict;
pub mod runs;
pub mod runtime;
pub mod search;
pub mod service;
pub mod synth;
#[cfg(feature = "torch")]
pub mod train;
pub mod transforms;
