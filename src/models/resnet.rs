//! RFNet's image encoder: torchvision's ResNet-50 (v1.5: the stride sits on the 3x3 conv of the
//! bottleneck), BatchNorm frozen in eval mode, plus the ImageNet preprocessing it was trained with.
//!
//! | ours          | reference                                                              |
//! |---------------|------------------------------------------------------------------------|
//! | `ResNet`      | `torchvision.models.resnet.ResNet` with `Bottleneck`, layers [3,4,6,3] |
//! | `Bottleneck`  | `torchvision.models.resnet.Bottleneck`                                 |
//!
//! Checkpoint keys are torchvision's (`conv1`, `bn1`, `layer1.0.conv1`, ..., `fc`); timm's
//! `resnet50.tv_in1k` uses the same names. The one remap: `downsample.0` / `downsample.1` (an
//! `nn.Sequential`) -> our `downsample.conv` / `downsample.bn`. `num_batches_tracked` buffers are
//! the only tensors of a checkpoint allowed to stay unused.
//!
//! `config.json` is optional (real checkpoints have none); the tiny test model divides every
//! width by 8: `{"architecture": "resnet50", "width_divisor": 8, "layers": [3, 4, 6, 3]}`.

use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{BatchNorm, BatchNormConfig, Linear, LinearConfig, PaddingConfig2d};
use burn::tensor::activation::relu;
use burn::tensor::backend::Backend;
use burn::tensor::module::max_pool2d;
use burn::tensor::{DType, Tensor, TensorData};
use image::RgbImage;
use serde::Deserialize;

use super::weights::{KeyRemap, LoadReport, Unused, WeightError, Weights, load_module};

/// ImageNet channel means (RGB, on [0, 1] pixels).
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// ImageNet channel standard deviations.
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];
/// Bottleneck output width = `expansion` x inner width.
pub const EXPANSION: usize = 4;
/// torchvision's BatchNorm2d epsilon.
const BN_EPS: f64 = 1e-5;

#[derive(Debug, thiserror::Error)]
pub enum ResNetError {
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error(transparent)]
    Weights(#[from] WeightError),
}

// ---------------------------------------------------------------------------------------------
// Config
// ---------------------------------------------------------------------------------------------

/// The folder's optional `config.json`; absent means torchvision's ResNet-50.
#[derive(Clone, Debug, Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ResNetConfig {
    /// `resnet50`, `resnet101` or `resnet152` (all Bottleneck networks).
    pub architecture: String,
    /// Divides the stem and every stage width (64, 128, 256, 512); 1 for real checkpoints.
    pub width_divisor: usize,
    /// Bottleneck blocks per stage ([3, 4, 6, 3] for ResNet-50).
    pub layers: [usize; 4],
    /// Classes of the `fc` head (1000 for ImageNet).
    pub num_classes: usize,
}

impl Default for ResNetConfig {
    fn default() -> Self {
        Self {
            architecture: "resnet50".into(),
            width_divisor: 1,
            layers: [3, 4, 6, 3],
            num_classes: 1000,
        }
    }
}

impl ResNetConfig {
    /// Read `dir/config.json` if it exists, else the ResNet-50 defaults.
    pub fn from_folder(dir: &Path) -> Result<Self, ResNetError> {
        let path = dir.join("config.json");
        if !path.is_file() {
            return Ok(Self::default());
        }
        let file_err = |reason: String| ResNetError::File {
            path: path.clone(),
            reason,
        };
        let text = std::fs::read_to_string(&path).map_err(|e| file_err(e.to_string()))?;
        let config: Self =
            serde_json::from_str(&text).map_err(|e| file_err(format!("not a ResNet config: {e}")))?;
        config.validate().map_err(file_err)?;
        Ok(config)
    }

    /// Check the fields describe a network we can build.
    pub fn validate(&self) -> Result<(), String> {
        if !matches!(self.architecture.as_str(), "resnet50" | "resnet101" | "resnet152") {
            return Err(format!(
                "architecture {:?} is not supported (resnet50, resnet101 or resnet152)",
                self.architecture
            ));
        }
        if self.width_divisor == 0 || 64 % self.width_divisor != 0 {
            return Err(format!("width_divisor {} does not divide 64", self.width_divisor));
        }
        if self.layers.contains(&0) {
            return Err(format!(
                "every stage needs at least one block, got layers {:?}",
                self.layers
            ));
        }
        if self.num_classes == 0 {
            return Err("num_classes is 0".into());
        }
        Ok(())
    }

    /// Width of the stem (64 / divisor).
    pub fn stem_width(&self) -> usize {
        64 / self.width_divisor
    }

    /// Channels of `forward_features` (512 * 4 / divisor; 2048 for ResNet-50).
    pub fn feature_channels(&self) -> usize {
        512 * EXPANSION / self.width_divisor
    }

    pub fn init<B: Backend>(&self, device: &B::Device) -> ResNet<B> {
        let mut inplanes = self.stem_width();
        let mut stage = |width: usize, blocks: usize, stride: usize| {
            let width = width / self.width_divisor;
            let out = width * EXPANSION;
            let stage: Vec<Bottleneck<B>> = (0..blocks)
                .map(|i| {
                    let (cin, s) = if i == 0 { (inplanes, stride) } else { (out, 1) };
                    BottleneckConfig {
                        in_channels: cin,
                        width,
                        stride: s,
                    }
                    .init(device)
                })
                .collect();
            inplanes = out;
            stage
        };
        let layer1 = stage(64, self.layers[0], 1);
        let layer2 = stage(128, self.layers[1], 2);
        let layer3 = stage(256, self.layers[2], 2);
        let layer4 = stage(512, self.layers[3], 2);
        ResNet {
            conv1: conv(3, self.stem_width(), 7, 2, 3, device),
            bn1: bn(self.stem_width(), device),
            layer1,
            layer2,
            layer3,
            layer4,
            fc: LinearConfig::new(self.feature_channels(), self.num_classes).init(device),
            batch_stats: false,
        }
    }
}

/// Shape of one `Bottleneck`.
#[derive(Clone, Debug)]
pub struct BottleneckConfig {
    /// Input channels.
    pub in_channels: usize,
    /// Inner width (the 3x3 conv's channels); the output is `width * 4`.
    pub width: usize,
    /// Stride of the 3x3 conv and of the downsample shortcut.
    pub stride: usize,
}

impl BottleneckConfig {
    pub fn init<B: Backend>(&self, device: &B::Device) -> Bottleneck<B> {
        let (cin, w, s) = (self.in_channels, self.width, self.stride);
        let out = w * EXPANSION;
        Bottleneck {
            conv1: conv(cin, w, 1, 1, 0, device),
            bn1: bn(w, device),
            conv2: conv(w, w, 3, s, 1, device),
            bn2: bn(w, device),
            conv3: conv(w, out, 1, 1, 0, device),
            bn3: bn(out, device),
            downsample: (s != 1 || cin != out).then(|| Downsample {
                conv: conv(cin, out, 1, s, 0, device),
                bn: bn(out, device),
            }),
            batch_stats: false,
        }
    }
}

fn conv<B: Backend>(
    cin: usize,
    cout: usize,
    k: usize,
    stride: usize,
    pad: usize,
    device: &B::Device,
) -> Conv2d<B> {
    Conv2dConfig::new([cin, cout], [k, k])
        .with_stride([stride, stride])
        .with_padding(PaddingConfig2d::Explicit(pad, pad, pad, pad))
        .with_bias(false)
        .init(device)
}

fn bn<B: Backend>(channels: usize, device: &B::Device) -> BatchNorm<B> {
    BatchNormConfig::new(channels).with_epsilon(BN_EPS).init(device)
}

// ---------------------------------------------------------------------------------------------
// Modules
// ---------------------------------------------------------------------------------------------

/// The 1x1 (strided) projection shortcut, torchvision's `downsample` `nn.Sequential`.
#[derive(Module, Debug)]
pub struct Downsample<B: Backend> {
    /// `downsample.0`
    pub conv: Conv2d<B>,
    /// `downsample.1`
    pub bn: BatchNorm<B>,
}

/// torchvision `Bottleneck`: 1x1 -> 3x3 (strided) -> 1x1 (x4), residual, ReLU.
#[derive(Module, Debug)]
pub struct Bottleneck<B: Backend> {
    pub conv1: Conv2d<B>,
    pub bn1: BatchNorm<B>,
    pub conv2: Conv2d<B>,
    pub bn2: BatchNorm<B>,
    pub conv3: Conv2d<B>,
    pub bn3: BatchNorm<B>,
    pub downsample: Option<Downsample<B>>,
    /// Normalise with batch statistics while training from scratch (see `ResNet::batch_statistics`).
    pub batch_stats: bool,
}

/// torchvision `ResNet` (Bottleneck variant).
#[derive(Module, Debug)]
pub struct ResNet<B: Backend> {
    pub conv1: Conv2d<B>,
    pub bn1: BatchNorm<B>,
    pub layer1: Vec<Bottleneck<B>>,
    pub layer2: Vec<Bottleneck<B>>,
    pub layer3: Vec<Bottleneck<B>>,
    pub layer4: Vec<Bottleneck<B>>,
    pub fc: Linear<B>,
    /// See `batch_statistics`.
    pub batch_stats: bool,
}

/// BatchNorm with the running statistics, whatever the backend (burn's `BatchNorm::forward`
/// switches to batch statistics on autodiff backends, which would be wrong for a frozen
/// encoder that gradients flow through).
pub fn frozen_batch_norm<B: Backend>(bn: &BatchNorm<B>, x: Tensor<B, 4>) -> Tensor<B, 4> {
    let inv_std = bn.running_var.value().add_scalar(bn.epsilon).sqrt().recip();
    let scale = bn.gamma.val() * inv_std;
    let shift = bn.beta.val() - bn.running_mean.value() * scale.clone();
    channel_affine(x, scale, shift)
}

/// Frozen (running statistics) or, when training from scratch, batch statistics on autodiff
/// backends (updating the running ones like burn's/torch's BatchNorm, momentum 0.1).
fn norm<B: Backend>(bn: &BatchNorm<B>, x: Tensor<B, 4>, batch_stats: bool) -> Tensor<B, 4> {
    if batch_stats && B::ad_enabled(&x.device()) {
        batch_norm_train(bn, x)
    } else {
        frozen_batch_norm(bn, x)
    }
}

/// Per-channel `x * scale + shift` as a depthwise 1x1 convolution: the same values as a
/// broadcast multiply-add, but contiguous (burn-flex's broadcast path copies strided tensors,
/// which dominated training time on the CPU).
fn channel_affine<B: Backend>(x: Tensor<B, 4>, scale: Tensor<B, 1>, shift: Tensor<B, 1>) -> Tensor<B, 4> {
    let c = scale.dims()[0];
    burn::tensor::module::conv2d(
        x,
        scale.reshape([c, 1, 1, 1]),
        Some(shift),
        burn::tensor::ops::ConvOptions::new([1, 1], [0, 0], [1, 1], c),
    )
}

/// BatchNorm with batch statistics (training from scratch).
fn batch_norm_train<B: Backend>(bn: &BatchNorm<B>, x: Tensor<B, 4>) -> Tensor<B, 4> {
    let [b, c, h, w] = x.dims();
    let n = (b * h * w) as f64;
    let xt = x.clone().swap_dims(0, 1).reshape([c, b * h * w]);
    let mean = xt.clone().mean_dim(1).reshape([c]);
    let var = (xt.clone() * xt).mean_dim(1).reshape([c]) - mean.clone().powf_scalar(2.0);
    let m = bn.momentum;
    bn.running_mean
        .update(bn.running_mean.value().mul_scalar(1.0 - m).add(mean.clone().detach().mul_scalar(m)).detach());
    let unbiased = var.clone().detach().mul_scalar(n / (n - 1.0).max(1.0));
    bn.running_var
        .update(bn.running_var.value().mul_scalar(1.0 - m).add(unbiased.mul_scalar(m)).detach());
    let scale = bn.gamma.val() * var.add_scalar(bn.epsilon).sqrt().recip();
    let shift = bn.beta.val() - mean * scale.clone();
    channel_affine(x, scale, shift)
}

impl<B: Backend> Bottleneck<B> {
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let bs = self.batch_stats;
        // 1. 1x1 reduce
        let h = relu(norm(&self.bn1, self.conv1.forward(x.clone()), bs));
        // 2. 3x3 (carries the stage's stride)
        let h = relu(norm(&self.bn2, self.conv2.forward(h), bs));
        // 3. 1x1 expand
        let h = norm(&self.bn3, self.conv3.forward(h), bs);
        // 4. shortcut and residual
        let shortcut = match &self.downsample {
            Some(d) => norm(&d.bn, d.conv.forward(x), bs),
            None => x,
        };
        relu(h + shortcut)
    }
}

impl<B: Backend> ResNet<B> {
    /// Train BatchNorm with batch statistics (an encoder trained from scratch); pretrained
    /// encoders keep their running statistics frozen (the default).
    pub fn batch_statistics(mut self, on: bool) -> Self {
        self.batch_stats = on;
        for stage in [&mut self.layer1, &mut self.layer2, &mut self.layer3, &mut self.layer4] {
            for block in stage.iter_mut() {
                block.batch_stats = on;
            }
        }
        self
    }

    /// conv1 (7x7 / 2), bn1, ReLU, max-pool 3x3 / 2 pad 1: [B, 3, H, W] -> [B, 64/div, H/4, W/4].
    pub fn stem(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let h = relu(norm(&self.bn1, self.conv1.forward(x), self.batch_stats));
        // burn pads max-pool windows with -inf like torch (and the input is >= 0 after ReLU).
        max_pool2d(h, [3, 3], [2, 2], [1, 1], [1, 1], false)
    }

    /// The four stages, `layer1` .. `layer4`.
    pub fn stages(&self) -> [&[Bottleneck<B>]; 4] {
        [&self.layer1, &self.layer2, &self.layer3, &self.layer4]
    }

    /// Run one stage's blocks.
    pub fn forward_stage(stage: &[Bottleneck<B>], x: Tensor<B, 4>) -> Tensor<B, 4> {
        stage.iter().fold(x, |h, block| block.forward(h))
    }

    /// `layer4`'s output before pooling: [B, 3, H, W] -> [B, 2048/div, H/32, W/32].
    pub fn forward_features(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        // 1. stem
        let mut h = self.stem(x);
        // 2. layer1 .. layer4
        for stage in self.stages() {
            h = Self::forward_stage(stage, h);
        }
        h
    }

    /// Global average pooling: [B, C, h, w] -> [B, C].
    pub fn pool(features: Tensor<B, 4>) -> Tensor<B, 2> {
        let [b, c, _, _] = features.dims();
        features.mean_dim(3).mean_dim(2).reshape([b, c])
    }

    /// ImageNet logits [B, num_classes].
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 2> {
        // 1. features
        let features = self.forward_features(x);
        // 2. average pool
        let pooled = Self::pool(features);
        // 3. classifier
        self.fc.forward(pooled)
    }
}

/// An RGB image resized (bilinear, antialiased when shrinking) to `width` x `height`, scaled to
/// [0, 1] and normalised with the ImageNet mean/std: [1, 3, height, width].
pub fn imagenet_input<B: Backend>(
    img: &RgbImage,
    width: u32,
    height: u32,
    device: &B::Device,
) -> Tensor<B, 4> {
    let resized = if img.dimensions() == (width, height) {
        img.clone()
    } else {
        image::imageops::resize(img, width, height, image::imageops::FilterType::Triangle)
    };
    let (w, h) = (width as usize, height as usize);
    let mut values = vec![0f32; 3 * h * w];
    for (x, y, px) in resized.enumerate_pixels() {
        for c in 0..3 {
            let v = px.0[c] as f32 / 255.0;
            values[c * h * w + y as usize * w + x as usize] = (v - IMAGENET_MEAN[c]) / IMAGENET_STD[c];
        }
    }
    Tensor::from_data(TensorData::new(values, [1, 3, h, w]), device)
}

// ---------------------------------------------------------------------------------------------
// Loading
// ---------------------------------------------------------------------------------------------

/// torchvision's `downsample.0/1` (Sequential indices) -> `downsample.conv/bn`.
pub fn resnet_remap() -> KeyRemap {
    KeyRemap::new()
        .rule(r"\.downsample\.0\.", ".downsample.conv.")
        .and_then(|r| r.rule(r"\.downsample\.1\.", ".downsample.bn."))
        .unwrap_or_default()
}

/// Load a ResNet folder: optional `config.json` + `model.safetensors` (torchvision keys).
pub fn load_resnet<B: Backend>(
    dir: &Path,
    dtype: DType,
    device: &B::Device,
) -> Result<(ResNet<B>, LoadReport), ResNetError> {
    let config = ResNetConfig::from_folder(dir)?;
    let file = dir.join("model.safetensors");
    let weights = Weights::open(std::slice::from_ref(&file))?;
    let model = config.init::<B>(device);
    let (model, report) = load_module(model, &weights, &resnet_remap(), dtype, Unused::Allow)?;
    // Only BatchNorm's step counters may stay unused.
    let unexpected: Vec<String> = report
        .unused
        .iter()
        .filter(|k| !k.ends_with("num_batches_tracked"))
        .cloned()
        .collect();
    if !unexpected.is_empty() {
        return Err(WeightError::Unused {
            files: weights.file_list(),
            unused: unexpected,
        }
        .into());
    }
    Ok((model, report))
}
