//! Running a written network with tract, for batches of one fixed size (a shorter last batch is
//! padded and its extra rows dropped).

use super::NetShape;
use anyhow::{Context, Result};
use tract_onnx::prelude::*;
use tract_onnx::tract_hir::infer::Factoid;

/// A network of one input `[N, C, H, W]` and one output `[N, D]`, planned for batches of `batch`.
pub struct OnnxNet {
    plan: TypedRunnableModel<TypedModel>,
    batch: usize,
    shape: NetShape,
}

impl OnnxNet {
    /// Plan the ONNX model in `bytes` (`what` names it in errors) for batches of `batch`.
    pub fn new(bytes: &[u8], what: &str, batch: usize) -> Result<Self> {
        let batch = batch.max(1);
        let model = tract_onnx::onnx()
            .model_for_read(&mut &bytes[..])
            .with_context(|| format!("{what}: not an ONNX model tract can read"))?;
        let declared = model.input_fact(0)?.shape.clone();
        let dims: Vec<Option<usize>> = declared
            .dims()
            .map(|d| {
                d.concretize()
                    .and_then(|d| d.to_i64().ok())
                    .map(|d| d as usize)
            })
            .collect();
        let chw = match dims.as_slice() {
            [_, Some(c), Some(h), Some(w)] => [*c, *h, *w],
            _ => anyhow::bail!("{what}: the input is not [N, C, H, W] with fixed C, H, W"),
        };
        let shape = [batch, chw[0], chw[1], chw[2]];
        let model = model
            .with_input_fact(0, f32::fact(shape).into())?
            .into_optimized()
            .with_context(|| format!("{what}: cannot plan the network"))?;
        let out = model
            .output_fact(0)?
            .shape
            .as_concrete()
            .map(<[usize]>::to_vec);
        let dim = match out.as_deref() {
            Some(&[n, d]) if n == batch => d,
            other => anyhow::bail!("{what}: the output has shape {other:?}, not [N, D]"),
        };
        Ok(Self {
            plan: model.into_runnable()?,
            batch,
            shape: NetShape { chw, dim },
        })
    }

    pub fn shape(&self) -> NetShape {
        self.shape
    }

    /// Rows `[n, D]` of `n` inputs laid out `[n, C, H, W]`, any `n`.
    pub fn run(&self, inputs: &[f32], n: usize) -> Result<Vec<f32>> {
        let NetShape { chw, dim } = self.shape;
        let one = self.shape.image_len(inputs, n)?;
        let mut rows = Vec::with_capacity(n * dim);
        let mut padded = Vec::new();
        for chunk in inputs.chunks(self.batch * one) {
            let images = chunk.len() / one;
            let full = if images == self.batch {
                chunk
            } else {
                padded.clear();
                padded.extend_from_slice(chunk);
                padded.resize(self.batch * one, 0.0);
                &padded
            };
            let shape = [self.batch, chw[0], chw[1], chw[2]];
            let input = Tensor::from_shape(&shape, full)?;
            let out = self.plan.run(tvec!(input.into()))?;
            rows.extend_from_slice(&out[0].as_slice::<f32>()?[..images * dim]);
        }
        Ok(rows)
    }
}
