//! Memory-efficient backward passes for burn's autodiff backends (RFFT's gradient pass): burn's
//! autodiff of ops written from primitives keeps every intermediate the primitives' backward
//! needs; these ops keep their inputs and a few per-row statistics and recompute the rest.
//!
//! **Attention** ([`try_attention`]). Written as `softmax(Q K^T / sqrt(d)) V`, burn's autodiff keeps
//! two full `[batch, heads, queries, keys]` tensors per call (the exponentials and the
//! probabilities): at SD 1.5's 64x64 latent with the CFG pair that is 2 x 537 MB per self-attention
//! layer in bf16, seven such layers in UNet + ControlNet — gigabytes PyTorch's SDPA never stores.
//! This op stores Q, K, V, the output O and the row log-sum-exp `L` (`[.., queries, 1]`) and
//! recomputes the probabilities in the backward pass (FlashAttention's backward, without the
//! tiling):
//!
//! ```text
//! P  = exp(Q K^T s - L)                 s = 1/sqrt(d)
//! dV = P^T dO
//! dS = P * (dO V^T - rowsum(dO * O))
//! dQ = s dS K,   dK = s dS^T Q
//! ```
//!
//! **GroupNorm (+ SiLU)** ([`try_group_norm_silu`]). burn's GroupNorm and SiLU keep about four
//! input-sized tensors for the backward pass (centred input, normalised input, affine output,
//! sigmoid); this op keeps the input and the per-group mean and 1/std (in f32) and recomputes the
//! rest — at 512 px the VAE decoder's 128-channel 512x512 maps are 67 MB each in bf16:
//!
//! ```text
//! x^ = (x - mean) * rstd,  y = gamma x^ + beta,  z = silu(y) (or y)
//! dy = dz * sig(y) * (1 + y (1 - sig(y)))        (dz without SiLU)
//! dgamma = sum dy x^,  dbeta = sum dy            (over batch and pixels)
//! dx = rstd * (g - mean_group(g) - x^ mean_group(g x^)),   g = dy * gamma
//! ```
//!
//! Model code is generic over `B: Backend`; these functions check at run time whether `B` is
//! `Autodiff<I, C>` for one of the inner backends this build has (burn-flex, CUDA, wgpu, Vulkan)
//! and either checkpointing strategy, like the GroupNorm kernel's dispatch (`kernels.rs`).
//! The job's policy (`RFSTUDIO_ATTENTION_BACKWARD=plain` / `RFSTUDIO_GROUPNORM_BACKWARD=plain`)
//! can keep burn's own autodiff of the primitives.

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::{BalancedCheckpointing, CheckpointStrategy, NoCheckpointing};
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{FloatDType, Tensor, TensorPrimitive};

use super::dispatch::via;
use super::kernels::GroupNormArgs;

type Qkv<B> = (Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>);

/// Runs `$f::<I, C>` on `$input` when `$B` is `Autodiff<I, C>` for an inner backend of this build
/// and either checkpointing strategy, returning its `Ok` from the enclosing function; falls
/// through with the input otherwise.
macro_rules! dispatch_autodiff {
    ($B:ty, $input:ident, $f:ident) => {
        dispatch_autodiff!(@inner $B, $input, $f, burn::backend::Flex);
        #[cfg(feature = "cuda")]
        dispatch_autodiff!(@inner $B, $input, $f, burn::backend::Cuda);
        #[cfg(feature = "wgpu")]
        dispatch_autodiff!(@inner $B, $input, $f, burn::backend::Wgpu);
        #[cfg(feature = "vulkan")]
        dispatch_autodiff!(@inner $B, $input, $f, burn::backend::Vulkan);
    };
    (@inner $B:ty, $input:ident, $f:ident, $I:ty) => {
        let $input = match via::<$B, Autodiff<$I, NoCheckpointing>, _, _, _, _>($input, $f::<$I, NoCheckpointing>) {
            Ok(out) => return Ok(out),
            Err(input) => input,
        };
        let $input = match via::<$B, Autodiff<$I, BalancedCheckpointing>, _, _, _, _>($input, $f::<$I, BalancedCheckpointing>) {
            Ok(out) => return Ok(out),
            Err(input) => input,
        };
    };
}

/// Non-causal attention of `[batch, heads, n, d]` queries against `[batch, heads, m, d]` keys and
/// `[batch, heads, m, dv]` values with the memory-efficient backward, when `B` is an autodiff
/// backend it knows and the shapes are plain (no broadcasting); `Err` gives the inputs back.
pub fn try_attention<B: Backend>(q: Tensor<B, 4>, k: Tensor<B, 4>, v: Tensor<B, 4>) -> Result<Tensor<B, 4>, Qkv<B>> {
    let [b, h, _, d] = q.dims();
    let [bk, hk, m, dk] = k.dims();
    let [bv, hv, mv, _] = v.dims();
    if super::policy::current().plain_attention_backward || (bk, hk, dk) != (b, h, d) || (bv, hv, mv) != (b, h, m) || d == 0 || m == 0 {
        return Err((q, k, v));
    }
    let input = (q, k, v);
    dispatch_autodiff!(B, input, attention);
    Err(input)
}


/// The float primitive of a tensor (`Err` for a quantized one).
fn float<B: Backend, const D: usize>(t: Tensor<B, D>) -> Result<B::FloatTensorPrimitive, Tensor<B, D>> {
    match t.into_primitive() {
        TensorPrimitive::Float(p) => Ok(p),
        other => Err(Tensor::from_primitive(other)),
    }
}

fn tensor<B: Backend, const D: usize>(p: B::FloatTensorPrimitive) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(p))
}

/// Forward on the inner backend: the output and the row log-sum-exp of the scaled scores.
fn forward<I: Backend>(q: Tensor<I, 4>, k: Tensor<I, 4>, v: Tensor<I, 4>, scale: f64) -> (Tensor<I, 4>, Tensor<I, 4>) {
    let scores = q.mul_scalar(scale).matmul(k.swap_dims(2, 3));
    let max = scores.clone().max_dim(3);
    let p = (scores - max.clone()).exp();
    let sum = p.clone().sum_dim(3);
    let out = p.matmul(v).div(sum.clone());
    (out, max + sum.log())
}

fn attention<I: Backend, C: CheckpointStrategy>(qkv: Qkv<Autodiff<I, C>>) -> Result<Tensor<Autodiff<I, C>, 4>, Qkv<Autodiff<I, C>>> {
    let (q, k, v) = qkv;
    let scale = 1.0 / (q.dims()[3] as f64).sqrt();
    let (q, k, v) = match (float(q), float(k), float(v)) {
        (Ok(q), Ok(k), Ok(v)) => (q, k, v),
        (q, k, v) => {
            let t = |r: Result<_, Tensor<Autodiff<I, C>, 4>>| r.map_or_else(|t| t, tensor::<Autodiff<I, C>, 4>);
            return Err((t(q), t(k), t(v)));
        }
    };
    let (qi, ki, vi) = (q.primitive.clone(), k.primitive.clone(), v.primitive.clone());
    let (out, lse) = forward::<I>(tensor(qi.clone()), tensor(ki.clone()), tensor(vi.clone()), scale);
    let out = out.into_primitive().tensor();
    Ok(record::<I, C, _>(AttentionBackward, [&q, &k, &v], out.clone(), || AttentionState {
        q: qi,
        k: ki,
        v: vi,
        out,
        lse: lse.into_primitive().tensor(),
        scale,
    }))
}

/// Records `op` in the autodiff graph as the producer of `out` with `parents` as its inputs; the
/// state for its backward pass is built (and kept) only when a parent is tracked.
fn record<I: Backend, C: CheckpointStrategy, O: Backward<I, 3>>(
    op: O,
    parents: [&FloatTensor<Autodiff<I, C>>; 3],
    out: I::FloatTensorPrimitive,
    state: impl FnOnce() -> O::State,
) -> Tensor<Autodiff<I, C>, 4> {
    let output = match op.prepare::<C>(parents.map(|t| t.node.clone())).compute_bound().stateful() {
        OpsKind::Tracked(prep) => prep.finish(state(), out),
        OpsKind::UnTracked(prep) => prep.finish(out),
    };
    tensor(output)
}

#[derive(Debug)]
struct AttentionBackward;

#[derive(Clone, Debug)]
struct AttentionState<I: Backend> {
    q: I::FloatTensorPrimitive,
    k: I::FloatTensorPrimitive,
    v: I::FloatTensorPrimitive,
    out: I::FloatTensorPrimitive,
    lse: I::FloatTensorPrimitive,
    scale: f64,
}

impl<I: Backend> Backward<I, 3> for AttentionBackward {
    type State = AttentionState<I>;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let [node_q, node_k, node_v] = ops.parents;
        let d_out = tensor::<I, 4>(grads.consume::<I>(&ops.node));
        let s = ops.state;
        let (q, k, v, out, lse) = (tensor::<I, 4>(s.q), tensor::<I, 4>(s.k), tensor::<I, 4>(s.v), tensor::<I, 4>(s.out), tensor::<I, 4>(s.lse));
        // The probabilities again, from the stored log-sum-exp.
        let p = (q.clone().mul_scalar(s.scale).matmul(k.clone().swap_dims(2, 3)) - lse).exp();
        if let Some(node) = node_v {
            let dv = p.clone().swap_dims(2, 3).matmul(d_out.clone());
            grads.register::<I>(node.id, dv.into_primitive().tensor());
        }
        if node_q.is_none() && node_k.is_none() {
            return;
        }
        let delta = (d_out.clone() * out).sum_dim(3);
        let ds = p * (d_out.matmul(v.swap_dims(2, 3)) - delta);
        if let Some(node) = node_q {
            let dq = ds.clone().matmul(k).mul_scalar(s.scale);
            grads.register::<I>(node.id, dq.into_primitive().tensor());
        }
        if let Some(node) = node_k {
            let dk = ds.swap_dims(2, 3).matmul(q).mul_scalar(s.scale);
            grads.register::<I>(node.id, dk.into_primitive().tensor());
        }
    }
}

/// `silu(norm(x))` (or `norm(x)`) with the memory-efficient backward when `B` is an autodiff
/// backend it knows; `Err` gives the operands back. Statistics in f32, output in `x`'s dtype.
pub(crate) fn try_group_norm_silu<B: Backend>(args: GroupNormArgs<B>) -> Result<Tensor<B, 4>, GroupNormArgs<B>> {
    if super::policy::current().plain_group_norm_backward {
        return Err(args);
    }
    let input = args;
    dispatch_autodiff!(B, input, group_norm_silu);
    Err(input)
}

/// The normalised input `x^` as `[N, G, cpg * H * W]` in f32, from the stored statistics.
fn normalised<I: Backend>(x: Tensor<I, 4>, mean: Tensor<I, 3>, rstd: Tensor<I, 3>, groups: usize) -> Tensor<I, 3> {
    let [n, c, h, w] = x.dims();
    (x.cast(FloatDType::F32).reshape([n, groups, c / groups * h * w]) - mean) * rstd
}

/// `gamma x^ + beta` per channel, `[N, C, H, W]` in f32.
fn affine<I: Backend>(xhat: Tensor<I, 3>, gamma: Tensor<I, 1>, beta: Tensor<I, 1>, shape: [usize; 4]) -> Tensor<I, 4> {
    let c = shape[1];
    let per_channel = |t: Tensor<I, 1>| t.cast(FloatDType::F32).reshape([1, c, 1, 1]);
    xhat.reshape(shape) * per_channel(gamma) + per_channel(beta)
}

#[allow(clippy::type_complexity)]
fn group_norm_silu<I: Backend, C: CheckpointStrategy>(
    args: GroupNormArgs<Autodiff<I, C>>,
) -> Result<Tensor<Autodiff<I, C>, 4>, GroupNormArgs<Autodiff<I, C>>> {
    let GroupNormArgs { x, gamma, beta, groups, eps, silu } = args;
    let [n, c, h, w] = x.dims();
    let device = x.device();
    let dtype = x.dtype();
    // No affine: an untracked gamma = 1, beta = 0 (no gradient is registered for them).
    let gamma = gamma.unwrap_or_else(|| Tensor::ones([c], (&device, dtype)));
    let beta = beta.unwrap_or_else(|| Tensor::zeros([c], (&device, dtype)));
    let (x, gamma, beta) = match (float(x), float(gamma), float(beta)) {
        (Ok(x), Ok(g), Ok(b)) => (x, g, b),
        (x, g, b) => {
            let x = x.map_or_else(|t| t, tensor::<Autodiff<I, C>, 4>);
            return Err(GroupNormArgs { x, gamma: g.ok().map(tensor), beta: b.ok().map(tensor), groups, eps, silu });
        }
    };
    let xi = tensor::<I, 4>(x.primitive.clone());
    let xg = xi.clone().cast(FloatDType::F32).reshape([n, groups, c / groups * h * w]);
    let mean = xg.clone().mean_dim(2);
    let centred = xg - mean.clone();
    let rstd = centred.clone().powf_scalar(2.0).mean_dim(2).add_scalar(eps).sqrt().recip();
    let y = affine(centred * rstd.clone(), tensor(gamma.primitive.clone()), tensor(beta.primitive.clone()), [n, c, h, w]);
    let z = if silu { burn::tensor::activation::silu(y) } else { y };
    let out = z.cast(dtype).into_primitive().tensor();
    Ok(record::<I, C, _>(GroupNormBackward, [&x, &gamma, &beta], out, || GroupNormState {
        x: x.primitive.clone(),
        gamma: gamma.primitive.clone(),
        beta: beta.primitive.clone(),
        mean: mean.into_primitive().tensor(),
        rstd: rstd.into_primitive().tensor(),
        groups,
        silu,
    }))
}

#[derive(Debug)]
struct GroupNormBackward;

#[derive(Clone, Debug)]
struct GroupNormState<I: Backend> {
    x: I::FloatTensorPrimitive,
    gamma: I::FloatTensorPrimitive,
    beta: I::FloatTensorPrimitive,
    mean: I::FloatTensorPrimitive,
    rstd: I::FloatTensorPrimitive,
    groups: usize,
    silu: bool,
}

impl<I: Backend> Backward<I, 3> for GroupNormBackward {
    type State = GroupNormState<I>;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let [node_x, node_gamma, node_beta] = ops.parents;
        let s = ops.state;
        let x = tensor::<I, 4>(s.x);
        let shape = x.dims();
        let [n, c, h, w] = shape;
        let dtype = x.dtype();
        let (gamma, beta) = (tensor::<I, 1>(s.gamma), tensor::<I, 1>(s.beta));
        let param_dtype = gamma.dtype();
        let dz = tensor::<I, 4>(grads.consume::<I>(&ops.node)).cast(FloatDType::F32);
        let xhat = normalised(x, tensor(s.mean), tensor(s.rstd.clone()), s.groups);
        let dy = if s.silu {
            let y = affine(xhat.clone(), gamma.clone(), beta, shape);
            let sig = burn::tensor::activation::sigmoid(y.clone());
            dz * sig.clone() * (y * (sig.neg().add_scalar(1.0))).add_scalar(1.0)
        } else {
            dz
        };
        let xhat = xhat.reshape(shape);
        // Sum over batch and pixels, per channel.
        let per_channel = |t: Tensor<I, 4>| t.sum_dim(0).sum_dim(2).sum_dim(3).reshape([c]).cast(param_dtype);
        if let Some(node) = node_gamma {
            grads.register::<I>(node.id, per_channel(dy.clone() * xhat.clone()).into_primitive().tensor());
        }
        if let Some(node) = node_beta {
            grads.register::<I>(node.id, per_channel(dy.clone()).into_primitive().tensor());
        }
        if let Some(node) = node_x {
            let len = c / s.groups * h * w;
            let g = (dy * gamma.cast(FloatDType::F32).reshape([1, c, 1, 1])).reshape([n, s.groups, len]);
            let xhat = xhat.reshape([n, s.groups, len]);
            let mean_g = g.clone().mean_dim(2);
            let mean_gx = (g.clone() * xhat.clone()).mean_dim(2);
            let dx = (g - mean_g - xhat * mean_gx) * tensor::<I, 3>(s.rstd);
            grads.register::<I>(node.id, dx.reshape(shape).cast(dtype).into_primitive().tensor());
        }
    }
}

#[cfg(test)]
mod tests {
    use burn::backend::autodiff::checkpoint::strategy::BalancedCheckpointing;
    use burn::backend::{Autodiff, Flex};
    use burn::tensor::backend::AutodiffBackend;
    use burn::tensor::{Distribution, Tensor};

    use super::try_attention;
    use crate::models::fused::sdpa_matmul;

    /// Output and gradients of the memory-efficient op against burn's autodiff of the matmul form,
    /// for self-attention (all inputs tracked) and cross-attention (only Q tracked), n != m, dv != d.
    fn matches_plain<A: AutodiffBackend>() {
        let device = Default::default();
        for (n, m, d, dv, track_kv) in [(24usize, 24usize, 8usize, 8usize, true), (17, 7, 5, 3, false), (9, 33, 16, 4, true)] {
            let q0 = Tensor::<A, 4>::random([2, 3, n, d], Distribution::Normal(0.0, 1.5), &device);
            let k0 = Tensor::<A, 4>::random([2, 3, m, d], Distribution::Normal(0.0, 1.5), &device);
            let v0 = Tensor::<A, 4>::random([2, 3, m, dv], Distribution::Normal(0.0, 1.0), &device);
            let w = Tensor::<A, 4>::random([2, 3, n, dv], Distribution::Normal(0.0, 1.0), &device);
            let run = |ours: bool| {
                let q = q0.clone().require_grad();
                let (k, v) = if track_kv {
                    (k0.clone().require_grad(), v0.clone().require_grad())
                } else {
                    (k0.clone(), v0.clone())
                };
                let out = if ours {
                    match try_attention(q.clone(), k.clone(), v.clone()) {
                        Ok(o) => o,
                        Err(_) => panic!("the memory-efficient op did not take this backend"),
                    }
                } else {
                    sdpa_matmul(q.clone(), k.clone(), v.clone(), false)
                };
                // A weighted sum, so that dO is not uniform.
                let grads = (out.clone() * w.clone()).sum().backward();
                let g = |t: &Tensor<A, 4>| t.grad(&grads).map(|g| g.into_data().to_vec::<f32>().unwrap_or_default());
                (out.into_data().to_vec::<f32>().unwrap_or_default(), g(&q), g(&k), g(&v))
            };
            let (ours, plain) = (run(true), run(false));
            let close = |a: &[f32], b: &[f32], what: &str| {
                assert_eq!(a.len(), b.len(), "{what}: lengths");
                let err = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
                assert!(err < 1e-5, "{what} ({n}x{m}, d {d}, dv {dv}): max abs difference {err}");
            };
            close(&ours.0, &plain.0, "output");
            close(&ours.1.clone().expect("dQ"), &plain.1.clone().expect("dQ"), "dQ");
            assert_eq!(ours.2.is_some(), track_kv, "dK present only when K is tracked");
            if track_kv {
                close(&ours.2.expect("dK"), &plain.2.expect("dK"), "dK");
                close(&ours.3.expect("dV"), &plain.3.expect("dV"), "dV");
            }
        }
    }

    #[test]
    fn attention_ad_gradients_match_plain_autodiff() {
        matches_plain::<Autodiff<Flex>>();
        matches_plain::<Autodiff<Flex, BalancedCheckpointing>>();
    }

    /// Output and gradients (x, gamma, beta) of the GroupNorm(+SiLU) op against burn's autodiff of
    /// `GroupNorm` + `silu`, with and without SiLU and affine, odd sizes.
    fn group_norm_matches_plain<A: AutodiffBackend>() {
        use burn::module::Param;
        use burn::nn::GroupNormConfig;

        use crate::models::kernels::{GroupNormArgs, burn_group_norm_silu};

        let device = Default::default();
        for (shape, groups, affine) in [([2usize, 12usize, 5usize, 3usize], 4usize, true), ([1, 6, 7, 1], 3, false), ([3, 8, 4, 4], 8, true)] {
            let c = shape[1];
            let x0 = Tensor::<A, 4>::random(shape, Distribution::Normal(0.5, 2.0), &device);
            let w = Tensor::<A, 4>::random(shape, Distribution::Normal(0.0, 1.0), &device);
            let g0 = Tensor::<A, 1>::random([c], Distribution::Normal(1.0, 0.5), &device);
            let b0 = Tensor::<A, 1>::random([c], Distribution::Normal(0.0, 0.5), &device);
            for act in [true, false] {
                let run = |ours: bool| {
                    let mut norm = GroupNormConfig::new(groups, c).with_affine(affine).init::<A>(&device);
                    if affine {
                        norm.gamma = Some(Param::from_tensor(g0.clone()));
                        norm.beta = Some(Param::from_tensor(b0.clone()));
                    }
                    let x = x0.clone().require_grad();
                    let out = if ours {
                        let Ok(args) = GroupNormArgs::new(x.clone(), &norm, act) else {
                            panic!("GroupNormArgs refused a module that fits its input");
                        };
                        match super::try_group_norm_silu(args) {
                            Ok(o) => o,
                            Err(_) => panic!("the memory-efficient GroupNorm did not take this backend"),
                        }
                    } else {
                        burn_group_norm_silu(x.clone(), &norm, act)
                    };
                    let grads = (out.clone() * w.clone()).sum().backward();
                    let v = |t: Option<Tensor<A::InnerBackend, 4>>| t.map(|g| g.into_data().to_vec::<f32>().unwrap_or_default());
                    let p = |t: &Option<Param<Tensor<A, 1>>>| {
                        t.as_ref().and_then(|p| p.val().grad(&grads)).map(|g| g.into_data().to_vec::<f32>().unwrap_or_default())
                    };
                    (out.into_data().to_vec::<f32>().unwrap_or_default(), v(x.grad(&grads)), p(&norm.gamma), p(&norm.beta))
                };
                let (ours, plain) = (run(true), run(false));
                let close = |a: &[f32], b: &[f32], what: &str| {
                    assert_eq!(a.len(), b.len(), "{what}: lengths");
                    let err = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
                    assert!(err < 1e-4, "{what} ({shape:?}, G{groups}, silu {act}, affine {affine}): max abs difference {err}");
                };
                close(&ours.0, &plain.0, "output");
                close(&ours.1.expect("dx"), &plain.1.expect("dx"), "dx");
                assert_eq!(ours.2.is_some(), affine, "dgamma exactly when affine");
                if affine {
                    close(&ours.2.expect("dgamma"), &plain.2.expect("dgamma"), "dgamma");
                    close(&ours.3.expect("dbeta"), &plain.3.expect("dbeta"), "dbeta");
                }
            }
        }
    }

    #[test]
    fn group_norm_ad_gradients_match_plain_autodiff() {
        group_norm_matches_plain::<Autodiff<Flex>>();
        group_norm_matches_plain::<Autodiff<Flex, BalancedCheckpointing>>();
    }

    #[test]
    fn attention_ad_leaves_other_backends_and_shapes_alone() {
        let device = Default::default();
        let q = Tensor::<Flex, 4>::zeros([1, 2, 4, 8], &device);
        assert!(try_attention(q.clone(), q.clone(), q.clone()).is_err(), "not an autodiff backend");
        let qa = Tensor::<Autodiff<Flex>, 4>::zeros([1, 2, 4, 8], &device);
        let kb = Tensor::<Autodiff<Flex>, 4>::zeros([1, 1, 4, 8], &device);
        assert!(try_attention(qa.clone(), kb.clone(), kb).is_err(), "broadcast heads");
    }
}
