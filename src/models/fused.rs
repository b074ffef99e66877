//! The models' entry points to attention and GroupNorm (+ SiLU): each call picks, by the job's
//! [`KernelPolicy`](policy::KernelPolicy), between the memory-efficient autodiff ops (RFFT's
//! gradient pass), rfstudio's cubecl kernels (CUDA, wgpu, Vulkan), burn's fused op and the plain
//! matmul form. Every choice computes the same function to rounding.

use burn::nn::GroupNorm;
use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;

use super::policy::{self, AttentionImpl, FlashKernel, LONG_ATTENTION};
use super::{autodiff_ops, kernels};

/// `silu(norm.forward(x))` (or `norm.forward(x)` when `silu` is false), with one fused kernel
/// (mean and variance in f32, normalise, affine, SiLU) on the CUDA and wgpu backends.
///
/// Under autodiff (RFFT's gradient pass) it takes [`autodiff_ops::try_group_norm_silu`],
/// whose backward recomputes the normalised input instead of storing burn's intermediates.
pub fn group_norm_silu<B: Backend>(x: Tensor<B, 4>, norm: &GroupNorm<B>, silu: bool) -> Tensor<B, 4> {
    let args = match kernels::GroupNormArgs::new(x, norm, silu) {
        Ok(args) => args,
        Err(x) => return kernels::burn_group_norm_silu(x, norm, silu),
    };
    let args = if B::ad_enabled(&args.x.device()) {
        match autodiff_ops::try_group_norm_silu(args) {
            Ok(y) => return y,
            Err(args) => args,
        }
    } else {
        args
    };
    #[cfg(any(feature = "cuda", feature = "wgpu"))]
    let args = match kernels::try_cube_group_norm_silu(args) {
        Ok(y) => return y,
        Err(args) => args,
    };
    kernels::burn_group_norm_silu(args.x, norm, silu)
}

/// Scaled dot-product attention on [B, heads, N, d] tensors, by the job's [`KernelPolicy`](policy::KernelPolicy).
///
/// Under autodiff (RFFT's gradient pass) non-causal calls take [`super::autodiff_ops`]'s op, whose
/// backward recomputes the attention probabilities instead of storing them.
pub fn sdpa<B: Backend>(q: Tensor<B, 4>, k: Tensor<B, 4>, v: Tensor<B, 4>, causal: bool) -> Tensor<B, 4> {
    let (q, k, v) = if !causal && B::ad_enabled(&q.device()) {
        match autodiff_ops::try_attention(q, k, v) {
            Ok(out) => return out,
            Err(qkv) => qkv,
        }
    } else {
        (q, k, v)
    };
    let policy = policy::current();
    let matmul = match policy.attention {
        AttentionImpl::Fused => false,
        AttentionImpl::Matmul => true,
        AttentionImpl::Auto => policy.long_attention_matmul && k.dims()[2] >= LONG_ATTENTION,
        AttentionImpl::Flash(kernel) if !causal && policy.flash_shaping => {
            return sdpa_flash(q, k, v, kernel);
        }
        AttentionImpl::Flash(_) => false,
    };
    if matmul { sdpa_matmul(q, k, v, causal) } else { sdpa_fused(q, k, v, causal) }
}

/// Non-causal attention with the cubek flash kernel `kernel` ([`kernels::flash_attention`]):
/// head dims padded to a multiple of 16 for the tensor-core tiles ([`sdpa_padded`]); calls it
/// does not take (sequence lengths that are not whole multiples of its tiles, head dims above
/// [`FLASH_MAX_HEAD_DIM`] such as the VAE's single 512-wide head, backends other than the cubecl
/// ones) take [`sdpa_matmul`].
pub fn sdpa_flash<B: Backend>(q: Tensor<B, 4>, k: Tensor<B, 4>, v: Tensor<B, 4>, kernel: FlashKernel) -> Tensor<B, 4> {
    let wide = q.dims()[3].max(v.dims()[3]) > FLASH_MAX_HEAD_DIM;
    if !policy::current().flash_shaping || wide || !kernel.takes(q.dims()[2], k.dims()[2]) {
        return sdpa_matmul(q, k, v, false);
    }
    sdpa_padded(q, k, v, FLASH_HEAD_MULTIPLE, |q, k, v| match kernels::flash_attention(q, k, v, kernel) {
        Ok(out) => out,
        Err((q, k, v)) => sdpa_matmul(q, k, v, false),
    })
}

/// burn's fused `attention` op with the default 1/sqrt(d) scale.
///
/// Where the job's policy asks for it (`flash_shaping`: the cubecl backends CUDA, wgpu, Vulkan),
/// the call is shaped for cubecl's tensor-core flash-attention kernel, which burn 0.21's autotune
/// only picks when the head dim is a multiple of 16 and the query length a multiple of 16 x its plane
/// count (else it runs an *unfused* softmax(QK^T)V fallback, 3.8 ms against 2.5 ms for our matmul
/// form on the H100): head dims like SD 1.5's 40 are zero-padded ([`sdpa_fused_padded`]), and query
/// lengths that are not a multiple of [`FLASH_SEQ_MULTIPLE`] or key lengths that are not a multiple
/// of [`FLASH_KV_MULTIPLE`] (the 77 text tokens of cross-attention, whose partial tiles the kernel
/// cannot tile at long query lengths) take [`sdpa_matmul`]. The latter also
/// keeps every call that reaches the kernel valid for it: cubecl's autotune cache rounds shapes to
/// buckets, and a bucket tuned to the flash kernel would otherwise panic on an invalid shape.
/// There the op runs through [`kernels::autotuned_attention`], which hands burn contiguous
/// tensors: cubek's flash kernels read views such as [`split_heads`]' wrongly.
pub fn sdpa_fused<B: Backend>(q: Tensor<B, 4>, k: Tensor<B, 4>, v: Tensor<B, 4>, causal: bool) -> Tensor<B, 4> {
    if policy::current().flash_shaping {
        // burn's autodiff backend always computes `attention` with its unfused fallback (there
        // is no flash backward): padding would only add work there.
        if B::ad_enabled(&q.device()) {
            return sdpa_matmul(q, k, v, causal);
        }
        if q.dims()[2] % FLASH_SEQ_MULTIPLE != 0 || k.dims()[2] % FLASH_KV_MULTIPLE != 0 {
            return sdpa_matmul(q, k, v, causal);
        }
        return sdpa_padded(q, k, v, FLASH_HEAD_MULTIPLE, |q, k, v| match kernels::autotuned_attention(q, k, v, causal) {
            Ok(out) => out,
            Err((q, k, v)) => fused_op(q, k, v, causal),
        });
    }
    fused_op(q, k, v, causal)
}

fn fused_op<B: Backend>(q: Tensor<B, 4>, k: Tensor<B, 4>, v: Tensor<B, 4>, causal: bool) -> Tensor<B, 4> {
    attention(
        q,
        k,
        v,
        None,
        None,
        AttentionModuleOptions {
            scale: None,
            softcap: None,
            is_causal: causal,
        },
    )
}

/// `op` (an attention with the default 1/sqrt(head dim) scale: burn's fused op, a cubek flash
/// kernel) with the head dims of Q/K and of V zero-padded to a multiple of `multiple`; exact:
/// zero columns add nothing to QK^T, Q is pre-scaled by sqrt(d_padded / d) so that the op's own
/// 1/sqrt(d_padded) scale (an explicit scale would send burn to its unfused fallback) gives
/// 1/sqrt(d), and the padded output columns are cut off.
pub fn sdpa_padded<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    multiple: usize,
    op: impl FnOnce(Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>) -> Tensor<B, 4>,
) -> Tensor<B, 4> {
    let round_up = |n: usize| n.div_ceil(multiple.max(1)) * multiple.max(1);
    let d = q.dims()[3];
    let dv = v.dims()[3];
    let (dp, dvp) = (round_up(d), round_up(dv));
    if dp == d && dvp == dv {
        return op(q, k, v);
    }
    let pad = |t: Tensor<B, 4>, to: usize| {
        let [b, h, n, c] = t.dims();
        if to == c {
            return t;
        }
        let zeros = Tensor::<B, 4>::zeros([b, h, n, to - c], &t.device()).cast(t.dtype());
        Tensor::cat(vec![t, zeros], 3)
    };
    let q = pad(q.mul_scalar((dp as f64 / d as f64).sqrt()), dp);
    let out = op(q, pad(k, dp), pad(v, dvp));
    let [b, h, n, _] = out.dims();
    out.slice([0..b, 0..h, 0..n, 0..dv])
}

/// Head-dim multiple of cubecl's tensor-core attention tiles (16x16x16 in f16).
pub const FLASH_HEAD_MULTIPLE: usize = 16;
/// Widest head [`sdpa_flash`] gives a flash kernel (SD 1.5's UNet tops out at 160): a flash
/// kernel keeps a query tile's whole head in registers / shared memory.
pub const FLASH_MAX_HEAD_DIM: usize = 160;
/// Query-length multiple that every plane count burn's autotune tries (2, 4, 8 planes of 16 rows) accepts.
pub const FLASH_SEQ_MULTIPLE: usize = 128;

/// Key-length multiple for the flash kernel (whole 16-key tiles for every partition we rely on).
pub const FLASH_KV_MULTIPLE: usize = 64;

/// `softmax(Q K^T / sqrt(d) [+ causal mask]) V` in two matmuls.
pub fn sdpa_matmul<B: Backend>(q: Tensor<B, 4>, k: Tensor<B, 4>, v: Tensor<B, 4>, causal: bool) -> Tensor<B, 4> {
    let [_, _, nq, d] = q.dims();
    let nk = k.dims()[2];
    let scores = q.mul_scalar(1.0 / (d as f64).sqrt()).matmul(k.swap_dims(2, 3));
    let scores = if causal {
        let mask = Tensor::<B, 2, burn::tensor::Bool>::tril_mask([nq, nk], 0, &scores.device());
        scores.mask_fill(mask.unsqueeze::<4>(), f32::NEG_INFINITY)
    } else {
        scores
    };
    burn::tensor::activation::softmax(scores, 3).matmul(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Distribution;

    type B = burn::backend::Flex;

    /// The two attention implementations agree, with and without the causal mask.
    #[test]
    fn attention_impls_agree() {
        let device = Default::default();
        let q = Tensor::<B, 4>::random([2, 3, 7, 8], Distribution::Normal(0.0, 1.0), &device);
        let k = Tensor::<B, 4>::random([2, 3, 7, 8], Distribution::Normal(0.0, 1.0), &device);
        let v = Tensor::<B, 4>::random([2, 3, 7, 8], Distribution::Normal(0.0, 1.0), &device);
        for causal in [false, true] {
            let fused = sdpa_fused(q.clone(), k.clone(), v.clone(), causal);
            let plain = sdpa_matmul(q.clone(), k.clone(), v.clone(), causal);
            let err = (fused - plain).abs().max().into_scalar();
            assert!(err < 1e-5, "causal {causal}: max abs difference {err}");
        }
        // The causal mask really masks: the first query sees only the first key.
        let out = sdpa_matmul(q.clone(), k.clone(), v.clone(), true);
        let first = out.slice([0..2, 0..3, 0..1, 0..8]);
        let err = (first - v.slice([0..2, 0..3, 0..1, 0..8])).abs().max().into_scalar();
        assert!(err < 1e-6, "first causal row must equal v[0]: {err}");
    }

    /// Off the cubecl backends (and for shapes its tiles do not cover) a flash call is the matmul
    /// form.
    #[test]
    fn sdpa_flash_elsewhere_is_the_matmul_form() {
        let device = Default::default();
        for (n, m) in [(64usize, 64usize), (7, 77)] {
            let q = Tensor::<B, 4>::random([1, 2, n, 40], Distribution::Normal(0.0, 1.0), &device);
            let k = Tensor::<B, 4>::random([1, 2, m, 40], Distribution::Normal(0.0, 1.0), &device);
            let v = Tensor::<B, 4>::random([1, 2, m, 40], Distribution::Normal(0.0, 1.0), &device);
            for kernel in FlashKernel::CANDIDATES {
                let flash = sdpa_flash(q.clone(), k.clone(), v.clone(), kernel);
                let err = (flash - sdpa_matmul(q.clone(), k.clone(), v.clone(), false)).abs().max().into_scalar();
                assert!(err < 1e-5, "{kernel} {n}x{m}: max abs difference {err}");
            }
            assert!(kernels::flash_attention(q.clone(), k.clone(), v.clone(), FlashKernel::DEFAULT).is_err());
        }
    }

    /// Padding the head dims for the flash kernel (40 -> 48 as SD 1.5's, and a V narrower than Q/K)
    /// gives the same attention.
    #[test]
    fn padded_attention_is_exact() {
        let device = Default::default();
        for (d, dv) in [(40usize, 40usize), (5, 3), (16, 16)] {
            let q = Tensor::<B, 4>::random([2, 3, 9, d], Distribution::Normal(0.0, 1.0), &device);
            let k = Tensor::<B, 4>::random([2, 3, 11, d], Distribution::Normal(0.0, 1.0), &device);
            let v = Tensor::<B, 4>::random([2, 3, 11, dv], Distribution::Normal(0.0, 1.0), &device);
            let padded = sdpa_padded(q.clone(), k.clone(), v.clone(), FLASH_HEAD_MULTIPLE, |q, k, v| sdpa_fused(q, k, v, false));
            assert_eq!(padded.dims(), [2, 3, 9, dv]);
            let plain = sdpa_matmul(q, k, v, false);
            let err = (padded - plain).abs().max().into_scalar();
            assert!(err < 1e-5, "d {d} dv {dv}: max abs difference {err}");
        }
        // With the cubecl shaping on (the policy of a job on a cubecl backend): padded at 128
        // queries and 64 keys, matmul at 7 queries or 77 keys.
        let cubecl = policy::KernelPolicy { flash_shaping: true, ..policy::KernelPolicy::default() };
        policy::scoped(cubecl, || {
            for (n, m) in [(128usize, 64usize), (7, 64), (128, 77)] {
                let q = Tensor::<B, 4>::random([1, 2, n, 40], Distribution::Normal(0.0, 1.0), &device);
                let k = Tensor::<B, 4>::random([1, 2, m, 40], Distribution::Normal(0.0, 1.0), &device);
                let v = Tensor::<B, 4>::random([1, 2, m, 40], Distribution::Normal(0.0, 1.0), &device);
                let err = (sdpa_fused(q.clone(), k.clone(), v.clone(), false) - sdpa_matmul(q, k, v, false))
                    .abs()
                    .max()
                    .into_scalar();
                assert!(err < 1e-5, "{n} queries, {m} keys: max abs difference {err}");
            }
            // Under autodiff (RFFT's gradient pass) the matmul form runs, and gradients reach Q.
            type AB = burn::backend::Autodiff<B>;
            let q = Tensor::<AB, 4>::random([1, 2, 128, 40], Distribution::Normal(0.0, 1.0), &device).require_grad();
            let k = Tensor::<AB, 4>::random([1, 2, 64, 40], Distribution::Normal(0.0, 1.0), &device);
            let v = Tensor::<AB, 4>::random([1, 2, 64, 40], Distribution::Normal(0.0, 1.0), &device);
            let out = sdpa_fused(q.clone(), k.clone(), v.clone(), false);
            let err = (out.clone() - sdpa_matmul(q.clone(), k, v, false)).abs().max().into_scalar();
            assert!(err < 1e-5, "autodiff: max abs difference {err}");
            let grads = out.powf_scalar(2.0).sum().backward();
            let g = q.grad(&grads).expect("a gradient for Q");
            assert_eq!(g.dims(), [1, 2, 128, 40]);
        });
    }
}

#[cfg(all(test, feature = "wgpu"))]
mod wgpu_tests {
    use std::sync::atomic::Ordering;

    use burn::module::Param;
    use burn::nn::GroupNormConfig;
    use burn::tensor::{Distribution, Tensor};

    use super::group_norm_silu;
    use crate::models::kernels::{CUSTOM_CALLS, burn_group_norm_silu};

    /// Whether a wgpu adapter is present; says that `test` is skipped when not.
    fn wgpu_adapter(test: &str) -> bool {
        let opened = std::panic::catch_unwind(|| {
            let device = burn::backend::wgpu::WgpuDevice::default();
            Tensor::<burn::backend::Wgpu, 1>::zeros([1], &device).into_data()
        });
        if opened.is_err() {
            println!("{test} skipped: no wgpu adapter");
        }
        opened.is_ok()
    }

    #[test]
    fn kernels_group_norm_silu_matches_burn_on_wgpu() {
        if !wgpu_adapter("kernels_group_norm_silu_matches_burn_on_wgpu") {
            return;
        }
        let device = burn::backend::wgpu::WgpuDevice::default();
        matches_burn::<burn::backend::Wgpu>("Wgpu", &device);
        // `Vulkan` is its own backend type (see `try_group_norm_silu`), on the same adapter.
        #[cfg(feature = "vulkan")]
        matches_burn::<burn::backend::Vulkan>("Vulkan", &device);
    }

    /// cubek's flash kernels through the custom op against the matmul form: `unit` runs on any
    /// Vulkan device with subgroups (its tiles are f16, hence the tolerance); the tensor-core
    /// kernels run where the device has cooperative matrices and otherwise must report why and
    /// give burn's unfused attention (then exact to rounding).
    #[test]
    fn kernels_flash_attention_matches_matmul_on_wgpu() {
        use super::{FlashKernel, sdpa_matmul};
        use crate::models::kernels::{autotuned_attention, clear_flash_failures, flash_attention, flash_failures};

        if !wgpu_adapter("kernels_flash_attention_matches_matmul_on_wgpu") {
            return;
        }
        type W = burn::backend::Wgpu;
        let device = burn::backend::wgpu::WgpuDevice::default();
        for (n, m, d, dv) in [(512usize, 512usize, 48usize, 48usize), (1024, 64, 16, 32)] {
            let q = Tensor::<W, 4>::random([2, 3, n, d], Distribution::Normal(0.0, 1.0), &device);
            let k = Tensor::<W, 4>::random([2, 3, m, d], Distribution::Normal(0.0, 1.0), &device);
            let v = Tensor::<W, 4>::random([2, 3, m, dv], Distribution::Normal(0.0, 1.0), &device);
            let reference = sdpa_matmul(q.clone(), k.clone(), v.clone(), false);
            for kernel in [FlashKernel::Unit, FlashKernel::DEFAULT, FlashKernel::TensorCore { planes: 4, seq_q: 2, seq_kv: 2 }] {
                clear_flash_failures();
                let Ok(out) = flash_attention(q.clone(), k.clone(), v.clone(), kernel) else {
                    panic!("{kernel} {n}x{m}: the op did not take a shape that is a whole number of its tiles");
                };
                assert_eq!(out.dims(), [2, 3, n, dv]);
                let diff: f32 = burn::tensor::ElementConversion::elem((out - reference.clone()).abs().max().into_scalar());
                let failed = flash_failures().into_iter().find(|(k, _)| *k == kernel);
                println!("flash {kernel} {n}x{m} d{d}/{dv}: max |diff| {diff:.3e}, {}", failed.as_ref().map_or("ran".to_string(), |(_, why)| format!("fell back: {why}")));
                let tolerance = if failed.is_some() { 1e-5 } else { 3e-3 };
                assert!(diff < tolerance, "{kernel} {n}x{m}: max |diff| {diff}");
                if kernel == FlashKernel::Unit {
                    assert!(failed.is_none(), "the unit kernel needs no tensor cores: {failed:?}");
                }
            }
        }
        // Inputs as the models give them at head dims that need no padding (80, 160): views with
        // the heads swapped out of `[batch, tokens, heads, d]`, not contiguous.
        let view = |t: usize, d: usize| Tensor::<W, 4>::random([1, t, 2, d], Distribution::Normal(0.0, 1.0), &device).swap_dims(1, 2);
        let (q, k, v) = (view(512, 32), view(512, 32), view(512, 32));
        let reference = sdpa_matmul(q.clone(), k.clone(), v.clone(), false);
        let Ok(out) = flash_attention(q.clone(), k.clone(), v.clone(), FlashKernel::Unit) else {
            panic!("unit 512x512 on views: not taken");
        };
        let diff: f32 = burn::tensor::ElementConversion::elem((out - reference.clone()).abs().max().into_scalar());
        println!("flash unit on swapped-head views 512x512 d32: max |diff| {diff:.3e}");
        assert!(diff < 3e-3, "views: max |diff| {diff}");
        // burn's autotuned op through the custom op (contiguous inputs), and burn's own op on the
        // views as it is (printed only: which kernel autotune picks depends on the device).
        let Ok(tuned) = autotuned_attention(q.clone(), k.clone(), v.clone(), false) else {
            panic!("autotuned attention on views: not taken");
        };
        let diff: f32 = burn::tensor::ElementConversion::elem((tuned - reference.clone()).abs().max().into_scalar());
        println!("autotuned attention (contiguous inputs) on swapped-head views 512x512 d32: max |diff| {diff:.3e}");
        assert!(diff < 3e-3, "autotuned on views: max |diff| {diff}");
        let burn_op = super::sdpa_fused(q, k, v, false);
        let diff: f32 = burn::tensor::ElementConversion::elem((burn_op - reference).abs().max().into_scalar());
        println!("burn's attention op on swapped-head views 512x512 d32: max |diff| {diff:.3e}");
        // Shapes that are not whole tiles, and a broadcast key, are given back.
        let q = Tensor::<W, 4>::random([1, 2, 100, 16], Distribution::Normal(0.0, 1.0), &device);
        assert!(flash_attention(q.clone(), q.clone(), q.clone(), FlashKernel::DEFAULT).is_err());
        let q = Tensor::<W, 4>::random([1, 2, 512, 16], Distribution::Normal(0.0, 1.0), &device);
        let kb = Tensor::<W, 4>::random([1, 1, 512, 16], Distribution::Normal(0.0, 1.0), &device);
        assert!(flash_attention(q, kb.clone(), kb, FlashKernel::Unit).is_err());
    }

    fn matches_burn<W: burn::tensor::backend::Backend>(name: &str, device: &W::Device) {
        let cases: [([usize; 4], usize, bool); 4] = [
            ([2, 320, 8, 8], 32, true),
            ([1, 64, 5, 7], 8, true),
            ([3, 32, 16, 16], 32, true),
            ([1, 64, 5, 7], 8, false),
        ];
        for (shape, groups, affine) in cases {
            let mut norm = GroupNormConfig::new(groups, shape[1])
                .with_epsilon(1e-5)
                .with_affine(affine)
                .init::<W>(device);
            if affine {
                let c = shape[1];
                norm.gamma = Some(Param::from_tensor(Tensor::random([c], Distribution::Normal(1.0, 0.5), device)));
                norm.beta = Some(Param::from_tensor(Tensor::random([c], Distribution::Normal(0.0, 0.5), device)));
            }
            let x = Tensor::<W, 4>::random(shape, Distribution::Normal(0.0, 1.0), device) * 3.0 + 1.0;
            for act in [true, false] {
                let before = CUSTOM_CALLS.load(Ordering::Relaxed);
                let ours = group_norm_silu(x.clone(), &norm, act);
                assert_eq!(CUSTOM_CALLS.load(Ordering::Relaxed), before + 1, "custom op did not run");
                let reference = burn_group_norm_silu(x.clone(), &norm, act);
                assert_eq!(ours.dims(), shape);
                let diff: f32 = burn::tensor::ElementConversion::elem((ours - reference).abs().max().into_scalar());
                println!("{name} group_norm_silu {shape:?} G{groups} affine={affine} silu={act}: max |diff| {diff:.3e}");
                assert!(diff < 1e-4, "{shape:?} G{groups} silu={act}: max |diff| {diff}");
            }
        }
    }
}
