//! Training: augmentations, the optimiser and its schedule, the training run and its report.

pub mod augment;
pub mod frozen;
pub mod optim;
pub mod report;
pub mod run;
