//! LoRA adapters (burn 0.21 has none): a low-rank update `W + scale * down @ up` of chosen weight
//! matrices of a frozen module, here the ControlNet's Linear layers and 1x1 convolutions.
//!
//! The adapters live in their own module (`LoraAdapters`, the only thing an optimizer sees); the
//! frozen base module is never modified. `merged` returns a copy of the base whose adapted
//! weights are `W + delta` — on an autodiff backend the copy's weights are graph nodes, so the
//! gradient of anything computed with it reaches `down` and `up`. That is the same function as
//! adding `x @ down @ up` beside each layer (the usual LoRA formulation), computed once per
//! forward instead of per token, and it makes merging for export trivial.
//!
//! | layer | burn weight | delta |
//! |---|---|---|
//! | `Linear` | `[in, out]` | `down [in, r] @ up [r, out]` |
//! | `Conv2d` 1x1 | `[out, in, 1, 1]` | `(down [in, r] @ up [r, out])^T` reshaped |
//!
//! `up` starts at zero (the adapted model starts equal to the base), `down` ~ N(0, 1/in).
//! `scale` = alpha / rank with alpha = rank (scale 1) unless set.

use std::collections::HashMap;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};

use super::ops::seeded_noise;
use serde::{Deserialize, Serialize};

/// One adapted weight of the base module.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoraTarget {
    /// Module path of the weight (`down_blocks.0.attentions.0.proj_in.weight`).
    pub path: String,
    pub in_features: usize,
    pub out_features: usize,
    /// A 1x1 convolution (else a Linear layer).
    pub conv: bool,
}

/// The trainable low-rank factors, one pair per target (same order as `LoraTarget`s).
#[derive(Module, Debug)]
pub struct LoraAdapters<B: Backend> {
    pub down: Vec<Param<Tensor<B, 2>>>,
    pub up: Vec<Param<Tensor<B, 2>>>,
}

/// A Linear or Conv2d weight of a module: its path and shape as burn stores it (Linear
/// `[in, out]`, Conv2d `[out, in, kh, kw]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WeightLayer {
    pub path: String,
    pub linear: bool,
    pub shape: Vec<usize>,
}

/// Lists the Linear and Conv2d weights of a module with their paths.
#[derive(Default)]
struct WeightFinder {
    path: Vec<String>,
    containers: Vec<String>,
    found: Vec<WeightLayer>,
}

impl<B: Backend> ModuleVisitor<B> for WeightFinder {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.path.push(name.to_string());
        self.containers.push(container_type.to_string());
    }
    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
        self.containers.pop();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if self.path.last().map(String::as_str) != Some("weight") {
            return;
        }
        // the container of the parameter is the innermost struct
        let container = self.containers.iter().rev().find(|c| c.starts_with("Struct:")).map(String::as_str);
        let linear = match container {
            Some("Struct:Linear") if D == 2 => true,
            Some("Struct:Conv2d") if D == 4 => false,
            _ => return,
        };
        self.found.push(WeightLayer {
            path: self.path.join("."),
            linear,
            shape: param.lazy_shape().dims::<D>().to_vec(),
        });
    }
}

/// Every Linear and Conv2d weight of `module` (in visiting order).
pub fn weight_layers<B: Backend, M: Module<B>>(module: &M) -> Vec<WeightLayer> {
    let mut finder = WeightFinder::default();
    module.visit(&mut finder);
    finder.found
}

/// Every Linear weight and 1x1 convolution weight of `module` (in visiting order): what RFFT's
/// adapters train.
pub fn lora_targets<B: Backend, M: Module<B>>(module: &M) -> Vec<LoraTarget> {
    weight_layers::<B, M>(module)
        .into_iter()
        .filter_map(|w| match (w.linear, w.shape.as_slice()) {
            (true, &[i, o]) => Some((w.path, i, o, false)),
            (false, &[o, i, 1, 1]) => Some((w.path, i, o, true)),
            _ => None,
        })
        .map(|(path, in_features, out_features, conv)| LoraTarget {
            path,
            in_features,
            out_features,
            conv,
        })
        .collect()
}

impl<B: Backend> LoraAdapters<B> {
    /// Fresh adapters: `down` ~ N(0, 1/in), `up` = 0. The values come from `seed` on the host
    /// (one stream per target), so a seed gives the same adapters on every device and whatever
    /// else uses the backend's random generator meanwhile (data-parallel peers build theirs
    /// while other threads load models).
    pub fn init(targets: &[LoraTarget], rank: usize, seed: u64, device: &B::Device) -> Self {
        let down = targets
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let std = 1.0 / (t.in_features as f32).sqrt();
                let stream = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(i as u64);
                let values: Vec<f32> = seeded_noise(stream, t.in_features * rank).into_iter().map(|v| v * std).collect();
                Param::from_tensor(Tensor::from_data(TensorData::new(values, [t.in_features, rank]), device))
            })
            .collect();
        let up = targets
            .iter()
            .map(|t| Param::from_tensor(Tensor::zeros([rank, t.out_features], device)))
            .collect();
        Self { down, up }
    }

    /// The weight updates `scale * down @ up` ([in, out]) in target order.
    pub fn deltas(&self, scale: f32) -> Vec<Tensor<B, 2>> {
        self.down
            .iter()
            .zip(&self.up)
            .map(|(d, u)| d.val().matmul(u.val()).mul_scalar(scale))
            .collect()
    }

    /// A copy of `base` with every target weight replaced by `W + delta`.
    pub fn merged<M: Module<B>>(&self, base: &M, targets: &[LoraTarget], scale: f32) -> M {
        // `deltas` are [in, out]; `add_deltas` takes PyTorch's [out, in].
        let deltas = targets.iter().zip(self.deltas(scale)).map(|(t, d)| (t.path.clone(), d.transpose())).collect();
        add_deltas(base.clone(), deltas)
    }
}

/// `module` with every weight named in `deltas` replaced by `W + delta`. Deltas are keyed by
/// module path and given in PyTorch's layout: `[out, in]` for a Linear, `[out, in * kh * kw]` for
/// a convolution. The one merge of low-rank updates, for RFFT's adapters (on autodiff backends
/// the merged weights are graph nodes) and for LoRA files.
pub fn add_deltas<B: Backend, M: Module<B>>(module: M, deltas: HashMap<String, Tensor<B, 2>>) -> M {
    let mut mapper = DeltaAdder {
        path: Vec::new(),
        containers: Vec::new(),
        deltas,
    };
    module.map(&mut mapper)
}

struct DeltaAdder<B: Backend> {
    path: Vec<String>,
    containers: Vec<String>,
    deltas: HashMap<String, Tensor<B, 2>>,
}

impl<B: Backend> ModuleMapper<B> for DeltaAdder<B> {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.path.push(name.to_string());
        self.containers.push(container_type.to_string());
    }
    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
        self.containers.pop();
    }
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let here = self.path.join(".");
        let Some(delta) = self.deltas.remove(&here) else { return param };
        let linear = self.containers.iter().rev().find(|c| c.starts_with("Struct:")).map(String::as_str) == Some("Struct:Linear");
        let (id, weight, mapper): (ParamId, Tensor<B, D>, _) = param.consume();
        let dims = weight.dims();
        // burn's Linear stores [in, out]; convolutions keep PyTorch's [out, in, kh, kw].
        let delta: Tensor<B, D> = if linear { delta.transpose().reshape(dims) } else { delta.reshape(dims) };
        let delta = if delta.dtype() == weight.dtype() { delta } else { delta.cast(weight.dtype()) };
        Param::from_mapped_value(id, weight + delta, mapper)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::{Autodiff, Flex};
    use burn::nn::conv::Conv2dConfig;
    use burn::nn::{Linear, LinearConfig};
    use burn::nn::conv::Conv2d;

    #[derive(Module, Debug)]
    struct Toy<B: Backend> {
        lin: Linear<B>,
        pointwise: Conv2d<B>,
        spatial: Conv2d<B>,
    }

    fn toy<B: Backend>(device: &B::Device) -> Toy<B> {
        Toy {
            lin: LinearConfig::new(3, 5).init(device),
            pointwise: Conv2dConfig::new([2, 4], [1, 1]).init(device),
            spatial: Conv2dConfig::new([2, 4], [3, 3]).init(device),
        }
    }

    #[test]
    fn lora_targets_linear_and_pointwise_only_and_merges_exactly() {
        type B = Flex;
        let device = Default::default();
        // `no_grad` maps every parameter, which initialises the lazy ones once
        let base = toy::<B>(&device).no_grad();
        let targets = lora_targets::<B, _>(&base);
        let paths: Vec<&str> = targets.iter().map(|t| t.path.as_str()).collect();
        assert_eq!(paths, ["lin.weight", "pointwise.weight"]);
        assert_eq!((targets[1].in_features, targets[1].out_features, targets[1].conv), (2, 4, true));
        let mut lora = LoraAdapters::<B>::init(&targets, 2, 7, &device);
        // untouched at init (up = 0)
        let same = lora.merged(&base, &targets, 1.0);
        let d = (same.lin.weight.val() - base.lin.weight.val()).abs().max().into_scalar();
        assert_eq!(d, 0.0);
        lora.up = lora
            .up
            .into_iter()
            .map(|p| p.map(|t| t.ones_like()))
            .collect();
        let merged = lora.merged(&base, &targets, 0.5);
        let expect = base.pointwise.weight.val()
            + lora.down[1].val().matmul(lora.up[1].val()).mul_scalar(0.5).transpose().reshape([4, 2, 1, 1]);
        let d = (merged.pointwise.weight.val() - expect).abs().max().into_scalar();
        assert!(d < 1e-6, "{d}");
        let d = (merged.spatial.weight.val() - base.spatial.weight.val()).abs().max().into_scalar();
        assert_eq!(d, 0.0);
    }

    #[test]
    fn lora_gradients_reach_the_factors_only() {
        type A = Autodiff<Flex>;
        let device = Default::default();
        let base = toy::<A>(&device).no_grad();
        let targets = lora_targets::<A, _>(&base);
        let lora = LoraAdapters::<A>::init(&targets, 2, 7, &device);
        let model = lora.merged(&base, &targets, 1.0);
        let x = Tensor::<A, 2>::ones([1, 3], &device);
        let loss = model.lin.forward(x).sum();
        let grads = loss.backward();
        assert!(lora.up[0].val().grad(&grads).is_some());
        assert!(base.lin.weight.val().grad(&grads).is_none());
    }
}
