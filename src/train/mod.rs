//! Training: augmentations, the optimiser and its schedule, and the training run.

pub mod augment;
pub mod optim;
pub mod run;
pub mod report;
