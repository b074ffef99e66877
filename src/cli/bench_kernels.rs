//! `rfstudio bench ops` (the kernels that dominate SD 1.5: 3x3 convolution, GroupNorm+SiLU, a
//! diffusers ResNet block, attention both ways, a large matmul) and `rfstudio bench score`
//! (RFNet at the paper's size, and the full U2-Net, at a batch of images). Timing commands for the
//! GPU machine; the same shapes as `gpu_baseline.py` / `gpu_score_baseline.py` so the two can be
//! compared line by line.


use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{GroupNorm, GroupNormConfig, PaddingConfig2d};
use burn::tensor::activation::silu;
use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, Int, Tensor};
use clap::Args;
use serde::Serialize;

use super::bench_common::{BenchError, failed, time_ms};
use crate::device::BackendJob;
use crate::models::fused::{group_norm_silu, sdpa, sdpa_flash, sdpa_matmul};
use crate::models::kernels::{clear_flash_failures, flash_failures};
use crate::models::policy::{self, AttentionImpl, FlashKernel, KernelPolicy, PolicyParseError};
use crate::models::resnet::ResNetConfig;
use crate::models::rfnet::{RfNetConfig, RfNetInput};
use crate::models::u2net::{U2NetArch, U2NetConfig};

#[derive(Args, Debug, Clone)]
pub struct BenchOpsArgs {
    /// Timed repetitions per kernel (after three warm-ups).
    #[arg(long, default_value_t = 20)]
    pub iters: usize,
    /// Matmul side (the baseline uses 4096).
    #[arg(long, default_value_t = 4096)]
    pub matmul: usize,
    /// Attention tokens (4096 = SD 1.5's 64x64 latent at 512 px).
    #[arg(long, default_value_t = 4096)]
    pub tokens: usize,
    /// Side of the convolution / GroupNorm feature maps (64 = SD 1.5's latent at 512 px).
    #[arg(long, default_value_t = 64)]
    pub latent: usize,
    /// Batches of the convolution / GroupNorm / ResNet-block lines (2 = one CFG pair, 8 = four).
    #[arg(long, value_delimiter = ',', default_value = "2,8")]
    pub conv_batches: Vec<usize>,
    /// cubek flash-attention kernels to time against each other at the 64x64 self-attention
    /// shape on the cubecl backends (`tc:PLANES:Q:KV` or `unit`; `all` = every candidate, `none`).
    #[arg(long, value_delimiter = ',', default_value = "all")]
    pub flash: Vec<String>,
}

impl BenchOpsArgs {
    /// The kernels `--flash` names.
    pub fn flash_kernels(&self) -> Result<Vec<FlashKernel>, PolicyParseError> {
        let mut named = Vec::new();
        for name in &self.flash {
            match name.trim().to_ascii_lowercase().as_str() {
                "all" => named.extend(FlashKernel::CANDIDATES),
                "none" | "" => {}
                other => named.push(other.parse::<FlashKernel>()?),
            }
        }
        // Each kernel once, in the order first named (`unit,all` times `unit` once).
        let mut out: Vec<FlashKernel> = Vec::new();
        for kernel in named {
            if !out.contains(&kernel) {
                out.push(kernel);
            }
        }
        Ok(out)
    }
}

#[derive(Args, Debug, Clone)]
pub struct BenchScoreArgs {
    /// Images per batch.
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    /// Timed repetitions (after two warm-ups).
    #[arg(long, default_value_t = 5)]
    pub iters: usize,
    /// Also time the full U2-Net (44 M parameters) at 320 px.
    #[arg(long)]
    pub u2net: bool,
}

#[derive(Serialize)]
pub struct OpTime {
    pub name: String,
    pub shape: String,
    pub ms: f64,
    pub tflops: Option<f64>,
    /// For the fused attention lines: max |fused - softmax(QK^T)V| on the same inputs (a check
    /// that the kernel burn's autotune picked computes the right thing at this precision); for
    /// the rfstudio GroupNorm+SiLU kernel: max |kernel - burn's ops|.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_abs_diff: Option<f64>,
    /// Why a flash-attention kernel line did not time that kernel (cubek could not set it up on
    /// this device, so burn's unfused attention ran).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unavailable: Option<String>,
}

#[derive(Serialize)]
pub struct OpsReport {
    pub bench: &'static str,
    pub device: String,
    /// The dtype the tensors really had (read back from a result, not from the request).
    pub dtype: String,
    /// The fastest cubek flash-attention kernel at the 64x64 self-attention shape that ran here
    /// and agreed with the matmul form (`--attention flash:<this>`); none off the cubecl backends.
    pub flash_best: Option<String>,
    pub ops: Vec<OpTime>,
}

/// Largest max |flash - matmul form| for a flash kernel to count as correct: its tiles are f16
/// (the scores of N(0, 1) inputs round at about 1e-3 there).
const FLASH_TOLERANCE: f64 = 1e-2;

#[derive(Serialize)]
pub struct ScoreReport {
    pub bench: &'static str,
    pub device: String,
    pub dtype: String,
    pub batch: usize,
    pub rfnet_ms_per_batch: f64,
    pub rfnet_images_per_s: f64,
    pub u2net_images_per_s: Option<f64>,
}

/// max |a - b| as f64 (read back in f32 whatever the tensors' precision).
fn max_abs_diff<B: Backend>(a: Tensor<B, 4>, b: Tensor<B, 4>) -> f64 {
    let d = (a - b).abs().max().into_data();
    d.iter::<f32>().next().map(f64::from).unwrap_or(f64::NAN)
}

pub struct OpsJob(pub BenchOpsArgs);

impl BackendJob for OpsJob {
    type Output = Result<OpsReport, BenchError>;

    fn run<B: Backend>(self, device: B::Device) -> Self::Output {
        let a = self.0;
        let n = a.iters;
        let flash_kernels = a.flash_kernels()?;
        let mut ops = Vec::new();
        let mut push = |name: &str, shape: String, ms: f64, flops: Option<f64>, diff: Option<f64>, unavailable: Option<String>| {
            eprintln!(
                "{name:<36} {shape:<28} {ms:9.3} ms{}{}",
                flops.map(|f| format!("  {:7.1} TFLOP/s", f / ms / 1e9)).unwrap_or_default(),
                diff.map(|d| format!("  max |diff| vs {} {d:.2e}", if name.starts_with("groupnorm") { "burn" } else { "matmul" }))
                    .unwrap_or_default()
            );
            if let Some(why) = &unavailable {
                eprintln!("{:<36} unavailable here, burn's unfused attention ran instead: {why}", "");
            }
            ops.push(OpTime {
                name: name.into(),
                shape,
                ms,
                tflops: flops.map(|f| f / ms / 1e9),
                max_abs_diff: diff,
                unavailable,
            });
        };
        let conv: Conv2d<B> = Conv2dConfig::new([320, 320], [3, 3])
            .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
            .init(&device);
        let gn: GroupNorm<B> = GroupNormConfig::new(32, 320).with_epsilon(1e-5).init(&device);
        let conv_b: Conv2d<B> = Conv2dConfig::new([320, 320], [3, 3])
            .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
            .init(&device);
        let gn_b: GroupNorm<B> = GroupNormConfig::new(32, 320).with_epsilon(1e-5).init(&device);
        let mut dtype = String::new();
        let l = a.latent.max(1);
        for &batch in &a.conv_batches {
            let x = Tensor::<B, 4>::random([batch.max(1), 320, l, l], Distribution::Normal(0.0, 1.0), &device);
            dtype = format!("{:?}", conv.forward(x.clone()).dtype());
            let flops = 2.0 * (batch * 320 * l * l) as f64 * 320.0 * 9.0;
            let ms = time_ms::<B, _>(&device, 3, n, || conv.forward(x.clone()))?;
            push("conv3x3 320->320", format!("{batch}x320x{l}x{l}"), ms, Some(flops), None, None);
            let ms = time_ms::<B, _>(&device, 3, n, || silu(gn.forward(x.clone())))?;
            push("groupnorm32+silu", format!("{batch}x320x{l}x{l}"), ms, None, None, None);
            // The same op through rfstudio's fused kernel (burn's ops on backends it does not cover).
            let ms = time_ms::<B, _>(&device, 3, n, || group_norm_silu(x.clone(), &gn, true))?;
            let diff = max_abs_diff(group_norm_silu(x.clone(), &gn, true), silu(gn.forward(x.clone())));
            push("groupnorm32+silu (rfstudio kernel)", format!("{batch}x320x{l}x{l}"), ms, None, Some(diff), None);
            // As the models run it (rfstudio's GroupNorm+SiLU where it applies).
            let ms = time_ms::<B, _>(&device, 3, n, || {
                let h = conv.forward(group_norm_silu(x.clone(), &gn, true));
                conv_b.forward(group_norm_silu(h, &gn_b, true)) + x.clone()
            })?;
            push("resnet block (2 conv)", format!("{batch}x320x{l}x{l}"), ms, Some(2.0 * flops), None, None);
        }
        // Attention as the UNet's 64x64 self-attention: 2 (CFG) x 8 heads x tokens x 40.
        let t = a.tokens;
        let q = Tensor::<B, 4>::random([2, 8, t, 40], Distribution::Normal(0.0, 1.0), &device);
        let k = Tensor::<B, 4>::random([2, 8, t, 40], Distribution::Normal(0.0, 1.0), &device);
        let v = Tensor::<B, 4>::random([2, 8, t, 40], Distribution::Normal(0.0, 1.0), &device);
        let flops = 4.0 * 16.0 * (t * t) as f64 * 40.0;
        // The fused lines run burn's op whatever `--attention` says (the rest of the job's policy,
        // such as the cubecl shaping, stays).
        let fused_policy = KernelPolicy { attention: AttentionImpl::Fused, ..policy::current() };
        // Both forms of one attention shape: the fused line (on cubecl backends exactly as burn
        // receives it, head dim 40 padded to 48 for the tensor-core flash kernel; unpadded is not
        // timed: both share one autotune bucket, and a bucket tuned to the flash kernel cannot run
        // an unpadded call) with its max |diff| from the matmul form, then the matmul form.
        let mut both = |fused: &str, plain: &str, shape: String, flops: Option<f64>, q: &Tensor<B, 4>, k: &Tensor<B, 4>, v: &Tensor<B, 4>| -> Result<(), BenchError> {
            let fused_call = || policy::scoped(fused_policy, || sdpa(q.clone(), k.clone(), v.clone(), false));
            let plain_call = || sdpa_matmul(q.clone(), k.clone(), v.clone(), false);
            let ms = time_ms::<B, _>(&device, 3, n, fused_call)?;
            push(fused, shape.clone(), ms, flops, Some(max_abs_diff(fused_call(), plain_call())), None);
            let ms = time_ms::<B, _>(&device, 3, n, plain_call)?;
            push(plain, shape, ms, flops, None, None);
            Ok(())
        };
        both("attention fused (burn op)", "attention softmax(QK^T)V", format!("2x8x{t}x40"), Some(flops), &q, &k, &v)?;
        // The UNet's deeper self-attention: a quarter of the tokens (32x32) at head dim 80, a
        // sixteenth (16x16) at 160.
        for (tokens, d) in [((t / 4).max(1), 80usize), ((t / 16).max(1), 160)] {
            let q = Tensor::<B, 4>::random([2, 8, tokens, d], Distribution::Normal(0.0, 1.0), &device);
            let k = Tensor::<B, 4>::random([2, 8, tokens, d], Distribution::Normal(0.0, 1.0), &device);
            let v = Tensor::<B, 4>::random([2, 8, tokens, d], Distribution::Normal(0.0, 1.0), &device);
            let flops = 4.0 * 16.0 * (tokens * tokens) as f64 * d as f64;
            both("attention fused (burn op)", "attention softmax(QK^T)V", format!("2x8x{tokens}x{d}"), Some(flops), &q, &k, &v)?;
        }
        // Cross-attention against 77 text tokens.
        let kc = Tensor::<B, 4>::random([2, 8, 77, 40], Distribution::Normal(0.0, 1.0), &device);
        let vc = Tensor::<B, 4>::random([2, 8, 77, 40], Distribution::Normal(0.0, 1.0), &device);
        both("cross-attn fused", "cross-attn softmax(QK^T)V", format!("2x8x{t}x40 . 77"), None, &q, &kc, &vc)?;
        // cubek's flash kernels by name (no autotune), the head dim padded to 48 as the models run
        // them; only on the cubecl backends, the only ones that have them. The fastest one that
        // ran and agrees with the matmul form is then checked at the deeper shapes too and named
        // in the report (`flash_best`: scripts/gpu-bench.sh generates with it).
        let mut best: Option<(FlashKernel, f64)> = None;
        // One flash kernel at one shape: ms, max |diff| from the matmul form, why it did not run.
        let flash_line = |kernel: FlashKernel, q: &Tensor<B, 4>, k: &Tensor<B, 4>, v: &Tensor<B, 4>| -> Result<(f64, f64, Option<String>), BenchError> {
            clear_flash_failures();
            let call = || sdpa_flash(q.clone(), k.clone(), v.clone(), kernel);
            let ms = time_ms::<B, _>(&device, 3, n, call)?;
            let diff = max_abs_diff(call(), sdpa_matmul(q.clone(), k.clone(), v.clone(), false));
            Ok((ms, diff, flash_failures().into_iter().find(|(k, _)| *k == kernel).map(|(_, why)| why)))
        };
        if policy::current().flash_shaping {
            for &kernel in &flash_kernels {
                if !kernel.takes(t, t) {
                    let (mq, mkv) = kernel.multiples();
                    eprintln!("attention flash {kernel}: skipped, {t} tokens are not a whole number of its {mq}-query / {mkv}-key tiles");
                    continue;
                }
                let (ms, diff, why) = flash_line(kernel, &q, &k, &v)?;
                if why.is_none() && diff < FLASH_TOLERANCE && best.is_none_or(|(_, b)| ms < b) {
                    best = Some((kernel, ms));
                }
                push(&format!("attention flash {kernel}"), format!("2x8x{t}x40"), ms, Some(flops), Some(diff), why);
            }
            if let Some((kernel, _)) = best {
                for (tokens, d) in [((t / 4).max(1), 80usize), ((t / 16).max(1), 160)] {
                    if !kernel.takes(tokens, tokens) {
                        continue;
                    }
                    let q = Tensor::<B, 4>::random([2, 8, tokens, d], Distribution::Normal(0.0, 1.0), &device);
                    let k = Tensor::<B, 4>::random([2, 8, tokens, d], Distribution::Normal(0.0, 1.0), &device);
                    let v = Tensor::<B, 4>::random([2, 8, tokens, d], Distribution::Normal(0.0, 1.0), &device);
                    let flops = 4.0 * 16.0 * (tokens * tokens) as f64 * d as f64;
                    let (ms, diff, why) = flash_line(kernel, &q, &k, &v)?;
                    push(&format!("attention flash {kernel}"), format!("2x8x{tokens}x{d}"), ms, Some(flops), Some(diff), why);
                }
            }
        }
        // A plain large matmul.
        let m = a.matmul;
        let x = Tensor::<B, 2>::random([m, m], Distribution::Normal(0.0, 1.0), &device);
        let y = Tensor::<B, 2>::random([m, m], Distribution::Normal(0.0, 1.0), &device);
        let ms = time_ms::<B, _>(&device, 3, n, || x.clone().matmul(y.clone()))?;
        push("matmul", format!("{m}^3"), ms, Some(2.0 * (m * m * m) as f64), None, None);
        // A linear layer as in the transformer blocks: [2*4096, 320] x [320, 1280] (GEGLU input).
        let h = Tensor::<B, 2>::random([2 * t, 320], Distribution::Normal(0.0, 1.0), &device);
        let w = Tensor::<B, 2>::random([320, 2560], Distribution::Normal(0.0, 1.0), &device);
        let ms = time_ms::<B, _>(&device, 3, n, || h.clone().matmul(w.clone()))?;
        push("linear (GEGLU proj)", format!("{}x320x2560", 2 * t), ms, Some(2.0 * (2 * t * 320 * 2560) as f64), None, None);
        Ok(OpsReport {
            bench: "ops",
            device: format!("{device:?}"),
            dtype,
            flash_best: best.map(|(kernel, _)| kernel.to_string()),
            ops,
        })
    }
}

pub struct ScoreJob(pub BenchScoreArgs);

/// bert-base-chinese's shape (random weights).
const BERT_BASE_CHINESE: &str = r#"{"vocab_size": 21128, "hidden_size": 768, "num_hidden_layers": 12,
 "num_attention_heads": 12, "intermediate_size": 3072, "max_position_embeddings": 512,
 "type_vocab_size": 2, "layer_norm_eps": 1e-12, "hidden_act": "gelu"}"#;

impl BackendJob for ScoreJob {
    type Output = Result<ScoreReport, BenchError>;

    fn run<B: Backend>(self, device: B::Device) -> Self::Output {
        let a = self.0;
        let b = a.batch.max(1);
        let bert: serde_json::Value = serde_json::from_str(BERT_BASE_CHINESE).map_err(failed)?;
        let config = RfNetConfig::paper(ResNetConfig::default(), bert);
        let model = config.init::<B>(&device).map_err(failed)?;
        let s = config.input_size;
        let img = || Tensor::<B, 4>::random([b, 3, s, s], Distribution::Normal(0.0, 1.0), &device);
        let tokens = config.max_caption_tokens;
        let input = RfNetInput {
            product: img(),
            generated: img(),
            depth: img(),
            saliency: img(),
            caption_ids: Tensor::<B, 2, Int>::from_data(
                burn::tensor::TensorData::new((0..b * tokens).map(|i| (i % 20000) as i64 + 100).collect::<Vec<_>>(), [b, tokens]),
                &device,
            ),
            caption_mask: Tensor::<B, 2, Int>::ones([b, tokens], &device),
        };
        let dtype = format!("{:?}", input.generated.dtype());
        let ms = time_ms::<B, _>(&device, 2, a.iters, || burn::tensor::activation::softmax(model.forward(input.clone(), true), 1))?;
        eprintln!("rfnet (paper size) batch {b}: {ms:.2} ms, {:.1} images/s", b as f64 * 1e3 / ms);
        let u2net_images_per_s = if a.u2net {
            let u2 = U2NetConfig::new(U2NetArch::U2net).init::<B>(&device);
            let x = Tensor::<B, 4>::random([b, 3, 320, 320], Distribution::Normal(0.0, 1.0), &device);
            let ms = time_ms::<B, _>(&device, 2, a.iters, || {
                let [d0, ..] = u2.forward(x.clone());
                d0
            })?;
            eprintln!("u2net 320 batch {b}: {ms:.2} ms, {:.1} images/s", b as f64 * 1e3 / ms);
            Some(b as f64 * 1e3 / ms)
        } else {
            None
        };
        Ok(ScoreReport {
            bench: "score",
            device: format!("{device:?}"),
            dtype,
            batch: b,
            rfnet_ms_per_batch: ms,
            rfnet_images_per_s: b as f64 * 1e3 / ms,
            u2net_images_per_s,
        })
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::BenchOpsArgs;
    use crate::models::policy::FlashKernel;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        ops: BenchOpsArgs,
    }

    fn kernels(args: &[&str]) -> Result<Vec<FlashKernel>, String> {
        let cli = Cli::try_parse_from(std::iter::once("bench-ops").chain(args.iter().copied())).map_err(|e| e.to_string())?;
        cli.ops.flash_kernels().map_err(|e| e.to_string())
    }

    /// `--flash`: every candidate by default, each kernel once in the order first named, `none`,
    /// and a clear error for an unknown name.
    #[test]
    fn bench_ops_flash_names_each_kernel_once() {
        assert_eq!(kernels(&[]), Ok(FlashKernel::CANDIDATES.to_vec()));
        assert_eq!(kernels(&["--flash", "none"]), Ok(vec![]));
        let all = kernels(&["--flash", "unit,all,tc:4:1:1"]).expect("valid names");
        assert_eq!(all.len(), FlashKernel::CANDIDATES.len());
        assert_eq!(all[0], FlashKernel::Unit);
        assert!(FlashKernel::CANDIDATES.iter().all(|k| all.contains(k)));
        assert_eq!(
            kernels(&["--flash", "tc:2:1:1,unit,tc:2:1:1"]),
            Ok(vec![FlashKernel::TensorCore { planes: 2, seq_q: 1, seq_kv: 1 }, FlashKernel::Unit])
        );
        let err = kernels(&["--flash", "wgmma"]).expect_err("unknown kernel");
        assert!(err.contains("wgmma") && err.contains("tc:PLANES:Q:KV"), "{err}");
    }
}
