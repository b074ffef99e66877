//! Small tensor operations with exact PyTorch semantics, built from matmuls and concatenation so
//! they behave the same on every backend and are differentiable (RFFT backpropagates through the
//! depth and saliency models).

use burn::tensor::backend::Backend;
use rand::{Rng, SeedableRng};
use burn::tensor::{Tensor, TensorData};

/// 1-D linear interpolation weights as `torch.nn.functional.interpolate(mode="bilinear")`
/// computes them: a [out, in] matrix.
fn interp_matrix(input: usize, output: usize, align_corners: bool) -> Vec<f32> {
    let mut m = vec![0f32; output * input];
    for o in 0..output {
        let src = if align_corners {
            if output > 1 {
                o as f64 * (input as f64 - 1.0) / (output as f64 - 1.0)
            } else {
                0.0
            }
        } else {
            ((o as f64 + 0.5) * input as f64 / output as f64 - 0.5).max(0.0)
        };
        let i0 = (src.floor() as usize).min(input - 1);
        let i1 = (i0 + 1).min(input - 1);
        let w1 = (src - i0 as f64) as f32;
        m[o * input + i0] += 1.0 - w1;
        m[o * input + i1] += w1;
    }
    m
}

/// Bilinear resize of [B, C, H, W] to [B, C, h, w] (no antialiasing), exactly
/// `F.interpolate(x, size=(h, w), mode="bilinear", align_corners=...)`.
pub fn resize_bilinear<B: Backend>(x: Tensor<B, 4>, h: usize, w: usize, align_corners: bool) -> Tensor<B, 4> {
    let [b, c, ih, iw] = x.dims();
    if (ih, iw) == (h, w) {
        return x;
    }
    let device = x.device();
    let ry = Tensor::<B, 2>::from_data(TensorData::new(interp_matrix(ih, h, align_corners), [h, ih]), &device);
    let rx = Tensor::<B, 2>::from_data(TensorData::new(interp_matrix(iw, w, align_corners), [w, iw]), &device);
    // rows: [h, ih] x [B*C, ih, iw] -> [B*C, h, iw]; columns: [B*C, h, iw] x [iw, w]
    let flat = x.reshape([b * c, ih, iw]);
    let rows = ry.unsqueeze::<3>().expand([b * c, h, ih]).matmul(flat);
    let out = rows.matmul(rx.transpose().unsqueeze::<3>().expand([b * c, iw, w]));
    out.reshape([b, c, h, w])
}

/// Pad the last two dimensions with a constant (left, right, top, bottom).
pub fn pad2d<B: Backend>(x: Tensor<B, 4>, left: usize, right: usize, top: usize, bottom: usize, value: f32) -> Tensor<B, 4> {
    if left + right + top + bottom == 0 {
        return x;
    }
    let [b, c, h, w] = x.dims();
    let device = x.device();
    let mut parts = Vec::new();
    if left > 0 {
        parts.push(Tensor::full([b, c, h, left], value, &device));
    }
    parts.push(x);
    if right > 0 {
        parts.push(Tensor::full([b, c, h, right], value, &device));
    }
    let x = Tensor::cat(parts, 3);
    let nw = w + left + right;
    let mut parts = Vec::new();
    if top > 0 {
        parts.push(Tensor::full([b, c, top, nw], value, &device));
    }
    parts.push(x);
    if bottom > 0 {
        parts.push(Tensor::full([b, c, bottom, nw], value, &device));
    }
    Tensor::cat(parts, 2)
}

/// TensorFlow-style "SAME" padding amounts (total, for one dimension).
pub fn same_padding(size: usize, kernel: usize, stride: usize, dilation: usize) -> usize {
    let out = size.div_ceil(stride);
    ((out.saturating_sub(1)) * stride + (kernel - 1) * dilation + 1).saturating_sub(size)
}

/// Standard-normal noise from a seed, generated on the host so that a seed gives the same
/// noise on every device (ChaCha-based `StdRng`, Box-Muller).
pub fn seeded_noise(seed: u64, n: usize) -> Vec<f32> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut out = Vec::with_capacity(n + 1);
    while out.len() < n {
        let u1: f64 = 1.0 - rng.random::<f64>();
        let u2: f64 = rng.random::<f64>();
        let r = (-2.0 * u1.ln()).sqrt();
        let theta = 2.0 * std::f64::consts::PI * u2;
        out.push((r * theta.cos()) as f32);
        out.push((r * theta.sin()) as f32);
    }
    out.truncate(n);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interp_matrix_rows_sum_to_one_and_match_torch_corners() {
        for (i, o, ac) in [(4, 8, false), (8, 4, false), (4, 8, true), (5, 3, true), (1, 4, false)] {
            let m = interp_matrix(i, o, ac);
            for r in 0..o {
                let s: f32 = m[r * i..(r + 1) * i].iter().sum();
                assert!((s - 1.0).abs() < 1e-6);
            }
        }
        // align_corners=True keeps the corner samples exactly.
        let m = interp_matrix(4, 7, true);
        assert_eq!(m[0], 1.0);
        assert_eq!(m[6 * 4 + 3], 1.0);
        // 2x upsampling with align_corners=False: output 1 = 0.75 * in0 + 0.25 * in1.
        let m = interp_matrix(4, 8, false);
        assert!((m[4] - 0.75).abs() < 1e-6 && (m[5] - 0.25).abs() < 1e-6);
    }

    #[test]
    fn same_padding_matches_tf() {
        assert_eq!(same_padding(32, 7, 2, 1), 5);
        assert_eq!(same_padding(16, 3, 2, 1), 1);
        assert_eq!(same_padding(8, 1, 2, 1), 0);
    }
}
