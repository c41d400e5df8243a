//! Models: CNN backbones from one registry of variants, and the heads that turn their features
//! into embeddings (GeM pooling, BatchNorm1d + Linear neck) and class logits (ArcFace).

pub mod config;
#[cfg(feature = "torch")]
pub mod efficientnet;
#[cfg(feature = "torch")]
pub mod efficientnet_lite;
#[cfg(feature = "torch")]
pub mod happywhale;
#[cfg(feature = "torch")]
pub mod heads;
#[cfg(feature = "torch")]
pub mod layers;
#[cfg(feature = "torch")]
pub mod nfnet;
#[cfg(feature = "torch")]
mod registry;
pub mod whitening;
#[cfg(feature = "torch")]
pub use registry::*;
