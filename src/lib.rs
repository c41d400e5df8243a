//! finprint identifies individual whales and dolphins from photos of their fins.
//!
//! The pipeline flows one way through these modules:
//!
//! | stage | module | holds |
//! |---|---|---|
//! | data | [`data`] | Kaggle CSVs, images, species names, folds, statistics |
//! | synthetic data | [`synth`] | a generated Kaggle-format catalogue of rendered fin photos |
//! | scoring | [`metrics`] | MAP@5 as Kaggle defines it |
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
