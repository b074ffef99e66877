//! Memory-efficient attention backward for burn's autodiff backends (RFFT's gradient pass).
//!
//! Written as `softmax(Q K^T / sqrt(d)) V` from differentiable primitives, attention makes burn's
//! autodiff keep two full `[batch, heads, queries, keys]` tensors per call for the backward pass
//! (the exponentials and the probabilities): at SD 1.5's 64x64 latent with the CFG pair that is
//! 2 x 537 MB per self-attention layer in bf16, seven such layers in UNet + ControlNet — gigabytes
//! PyTorch's SDPA never stores. This op stores Q, K, V, the output O and the row log-sum-exp `L`
//! (`[.., queries, 1]`) and recomputes the probabilities in the backward pass
//! (FlashAttention's backward, without the tiling):
//!
//! ```text
//! P  = exp(Q K^T s - L)                 s = 1/sqrt(d)
//! dV = P^T dO
//! dS = P * (dO V^T - rowsum(dO * O))
//! dQ = s dS K,   dK = s dS^T Q
//! ```
//!
//! Model code is generic over `B: Backend`; [`try_attention`] checks at run time whether `B` is
//! `Autodiff<I, C>` for one of the inner backends this build has (burn-flex, CUDA, wgpu, Vulkan)
//! and either checkpointing strategy, like the GroupNorm kernel's dispatch (`kernels.rs`).
//! `RFSTUDIO_ATTENTION_BACKWARD=plain` keeps burn's own autodiff of the primitives (read once).

use std::any::{Any, TypeId};

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::{BalancedCheckpointing, CheckpointStrategy, NoCheckpointing};
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorPrimitive};

type Qkv<B> = (Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>);

/// Non-causal attention of `[batch, heads, n, d]` queries against `[batch, heads, m, d]` keys and
/// `[batch, heads, m, dv]` values with the memory-efficient backward, when `B` is an autodiff
/// backend it knows and the shapes are plain (no broadcasting); `Err` gives the inputs back.
pub fn try_attention<B: Backend>(q: Tensor<B, 4>, k: Tensor<B, 4>, v: Tensor<B, 4>) -> Result<Tensor<B, 4>, Qkv<B>> {
    let [b, h, _, d] = q.dims();
    let [bk, hk, m, dk] = k.dims();
    let [bv, hv, mv, _] = v.dims();
    if plain_backward() || (bk, hk, dk) != (b, h, d) || (bv, hv, mv) != (b, h, m) || d == 0 || m == 0 {
        return Err((q, k, v));
    }
    let mut qkv = (q, k, v);
    macro_rules! via {
        ($inner:ty) => {
            qkv = match via::<B, $inner, NoCheckpointing>(qkv) {
                Ok(o) => return Ok(o),
                Err(qkv) => qkv,
            };
            qkv = match via::<B, $inner, BalancedCheckpointing>(qkv) {
                Ok(o) => return Ok(o),
                Err(qkv) => qkv,
            };
        };
    }
    via!(burn::backend::Flex);
    #[cfg(feature = "cuda")]
    via!(burn::backend::Cuda);
    #[cfg(feature = "wgpu")]
    via!(burn::backend::Wgpu);
    #[cfg(feature = "vulkan")]
    via!(burn::backend::Vulkan);
    Err(qkv)
}

/// Whether `RFSTUDIO_ATTENTION_BACKWARD=plain` asks for burn's autodiff of the primitives.
fn plain_backward() -> bool {
    static PLAIN: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *PLAIN.get_or_init(|| {
        std::env::var("RFSTUDIO_ATTENTION_BACKWARD").is_ok_and(|v| v.trim().eq_ignore_ascii_case("plain"))
    })
}

/// Runs [`attention`] when `B` is exactly `Autodiff<I, C>`, moving the tensors through `Box<dyn Any>`.
fn via<B: Backend, I: Backend, C: CheckpointStrategy>(qkv: Qkv<B>) -> Result<Tensor<B, 4>, Qkv<B>> {
    if TypeId::of::<B>() != TypeId::of::<Autodiff<I, C>>() {
        return Err(qkv);
    }
    let boxed: Box<dyn Any> = Box::new(qkv);
    let qkv = match boxed.downcast::<Qkv<Autodiff<I, C>>>() {
        Ok(qkv) => *qkv,
        Err(boxed) => return Err(back(boxed)),
    };
    match attention::<I, C>(qkv) {
        Ok(o) => {
            let boxed: Box<dyn Any> = Box::new(o);
            Ok(back(boxed))
        }
        Err(qkv) => {
            let boxed: Box<dyn Any> = Box::new(qkv);
            Err(back(boxed))
        }
    }
}

/// A `Box<dyn Any>` holding a `T` (the caller checked the types are the same by `TypeId`).
fn back<T: 'static>(boxed: Box<dyn Any>) -> T {
    match boxed.downcast::<T>() {
        Ok(t) => *t,
        Err(_) => unreachable!("attention_ad: tensor type changed across a downcast"),
    }
}

/// The float primitive of a tensor (`None` for a quantized one).
fn float<B: Backend>(t: Tensor<B, 4>) -> Result<B::FloatTensorPrimitive, Tensor<B, 4>> {
    match t.into_primitive() {
        TensorPrimitive::Float(p) => Ok(p),
        other => Err(Tensor::from_primitive(other)),
    }
}

fn tensor<B: Backend>(p: B::FloatTensorPrimitive) -> Tensor<B, 4> {
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
            let t = |r: Result<_, Tensor<Autodiff<I, C>, 4>>| r.map_or_else(|t| t, tensor::<Autodiff<I, C>>);
            return Err((t(q), t(k), t(v)));
        }
    };
    let (qi, ki, vi) = (q.primitive.clone(), k.primitive.clone(), v.primitive.clone());
    let (out, lse) = forward::<I>(tensor(qi.clone()), tensor(ki.clone()), tensor(vi.clone()), scale);
    let out = out.into_primitive().tensor();
    let output = match AttentionBackward
        .prepare::<C>([q.node.clone(), k.node.clone(), v.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let state = AttentionState {
                q: qi,
                k: ki,
                v: vi,
                out: out.clone(),
                lse: lse.into_primitive().tensor(),
                scale,
            };
            prep.finish(state, out)
        }
        OpsKind::UnTracked(prep) => prep.finish(out),
    };
    Ok(tensor::<Autodiff<I, C>>(output))
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
        let d_out = tensor::<I>(grads.consume::<I>(&ops.node));
        let s = ops.state;
        let (q, k, v, out, lse) = (tensor::<I>(s.q), tensor::<I>(s.k), tensor::<I>(s.v), tensor::<I>(s.out), tensor::<I>(s.lse));
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

#[cfg(test)]
mod tests {
    use burn::backend::autodiff::checkpoint::strategy::BalancedCheckpointing;
    use burn::backend::{Autodiff, Flex};
    use burn::tensor::backend::AutodiffBackend;
    use burn::tensor::{Distribution, Tensor};

    use super::try_attention;
    use crate::models::diffusers_blocks::sdpa_matmul;

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
