//! finprint identifies individual whales and dolphins from photos of their fins.
//!
//! The pipeline flows one way through these modules:
//!
//! | stage | module | holds |
//! |---|---|---|
//! | data | [`data`] | Kaggle CSVs, images, species names, folds, statistics |
//! | synthetic data | [`synth`] | a generated Kaggle-format catalogue of rendered fin photos |
//! | crops | [`crops`] | box files, the saliency crop, the ONNX detector, crop sets |
//! | model | [`model`] | backbones (registry), GeM, neck, ArcFace; checkpoints |
//! | training | [`train`] | augmentations, AdamW, runs with validation, reports |
//! | embeddings | [`embed`] | photos to unit vectors, flip TTA, model fusion |
//! | search | [`search`] | the `Index` trait: exact (f32/f16) and HNSW |
//! | prediction | [`predict`] | ranking individuals, `new_individual`, kNN + head fusion |
//! | scoring | [`metrics`] | MAP@5 as Kaggle defines it |
//! | catalogue | [`catalog`] | individuals, photos, sightings and decisions in SQLite |
//! | service | [`service`] | the HTTP API and web page over a catalogue |
//!
//! [`runtime`] picks the device and threads.
//!
//! Every file written goes through [`fsio`]: a temporary file, then a rename.

pub mod catalog;
pub mod crops;
pub mod data;
pub mod embed;
pub mod fsio;
pub mod metrics;
pub mod model;
pub mod predict;
pub mod runtime;
pub mod search;
pub mod service;
pub mod synth;
pub mod train;
