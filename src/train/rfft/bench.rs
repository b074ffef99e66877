//! Timing RFFT iterations (`rfstudio bench rfft`): the same chain, objective and optimizer step
//! as training, on a given batch.

use std::time::Instant;

use burn::module::{AutodiffModule, Module};
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::tensor::Tensor;
use burn::tensor::backend::{AutodiffBackend, Backend};
use serde::Serialize;

use super::error::RfftError;
use super::objective::{Batch, Frozen, StepSettings, objective};
use super::trainer::{LoraControlNet, LoraInfo, RequireGrad, Trainable};
use crate::models::controlnet::ControlNetModel;
use crate::models::lora::{LoraAdapters, lora_targets};
use crate::pipeline::scheduler::{Ddim, Scheduler};

/// Timings of RFFT iterations (milliseconds unless named otherwise).
#[derive(Clone, Debug, Default, Serialize)]
pub struct IterationTimes {
    /// One no-gradient chain step (CFG pair through ControlNet + UNet, DDIM, blend).
    pub chain_step_ms: f64,
    /// The gradient step's forward (ControlNet + UNet pair, decode, DPT, U2-Net, RFNet, reg).
    pub forward_ms: f64,
    pub backward_ms: f64,
    pub optimizer_ms: f64,
    /// A whole iteration: the chain to the middle of the last-steps window, forward, backward,
    /// optimizer step (mean over the timed iterations).
    pub iteration_s: f64,
    pub trainable_params: usize,
    /// Peak resident memory of the process (CPU backend only).
    pub peak_memory_bytes: Option<u64>,
}

fn sync<B: Backend>(device: &B::Device) {
    let _ = B::sync(device);
}

/// Time `iters` RFFT iterations (after one warm-up) on a synthetic batch: the full ControlNet
/// when `lora_rank` is 0, else LoRA adapters. Models must be frozen (`no_grad`) except the
/// reference ControlNet, which is copied as the trainable one.
#[allow(clippy::too_many_arguments)]
pub fn time_iterations<AB: AutodiffBackend>(
    frozen: &Frozen<AB>,
    reference: &ControlNetModel<AB>,
    scheduler: &Ddim,
    batch: &Batch<AB::InnerBackend>,
    settings: &StepSettings,
    lora_rank: usize,
    iters: usize,
    memory: fn() -> Option<u64>,
    device: &AB::Device,
) -> Result<IterationTimes, RfftError> {
    let reference = reference.clone().no_grad();
    if lora_rank == 0 {
        let cn = reference.clone().map(&mut RequireGrad);
        time_loop(frozen, &reference, cn, scheduler, batch, settings, iters, memory, device)
    } else {
        let targets = lora_targets::<AB, _>(&reference);
        let m = LoraControlNet {
            adapters: LoraAdapters::init(&targets, lora_rank, 0, device),
            info: LoraInfo {
                rank: lora_rank,
                scale: 1.0,
                targets,
            },
        };
        time_loop(frozen, &reference, m, scheduler, batch, settings, iters, memory, device)
    }
}

#[allow(clippy::too_many_arguments)]
fn time_loop<AB: AutodiffBackend, M: Trainable<AB>>(
    frozen: &Frozen<AB>,
    reference: &ControlNetModel<AB>,
    mut trainable: M,
    scheduler: &Ddim,
    batch: &Batch<AB::InnerBackend>,
    settings: &StepSettings,
    iters: usize,
    memory: fn() -> Option<u64>,
    device: &AB::Device,
) -> Result<IterationTimes, RfftError> {
    let frozen_inner = frozen.inner();
    let mut optim = AdamWConfig::new().with_weight_decay(1e-2).init::<AB, M>();
    let steps = scheduler.timesteps().len();
    let k = steps.saturating_sub(5).min(steps - 1);
    let t = scheduler.timesteps()[k];
    let mut times = IterationTimes {
        trainable_params: trainable.num_params(),
        ..Default::default()
    };
    let ms = |s: Instant| s.elapsed().as_secs_f64() * 1e3;
    for it in 0..=iters.max(1) {
        let timed = it > 0;
        let whole = Instant::now();
        let cn = trainable.controlnet(reference);
        let cn_inner = cn.valid();
        // the chain: time one step, then run the rest
        let s = Instant::now();
        let start = batch.inpaint.start(scheduler);
        let x1 = batch.chain(&frozen_inner.unet, &cn_inner, scheduler, 0..1, start.clone(), settings)?;
        let _ = x1.into_data();
        let one = ms(s);
        let x = batch.chain(&frozen_inner.unet, &cn_inner, scheduler, 0..k, start, settings)?;
        sync::<AB::InnerBackend>(device);
        let b = Batch::<AB>::from_inner(batch.clone());
        let s = Instant::now();
        let obj = objective(frozen, &cn, Some(reference), scheduler, &b, Tensor::from_inner(x), t, settings)?;
        let total = obj.total.clone();
        let _ = total.clone().into_data();
        let fwd = ms(s);
        let s = Instant::now();
        let grads = total.backward();
        let grads = GradientsParams::from_grads(grads, &trainable);
        sync::<AB>(device);
        let bwd = ms(s);
        let s = Instant::now();
        trainable = optim.step(1e-5, trainable, grads);
        sync::<AB>(device);
        let opt = ms(s);
        if timed {
            let n = iters.max(1) as f64;
            times.chain_step_ms += one / n;
            times.forward_ms += fwd / n;
            times.backward_ms += bwd / n;
            times.optimizer_ms += opt / n;
            times.iteration_s += whole.elapsed().as_secs_f64() / n;
        }
    }
    times.peak_memory_bytes = memory();
    Ok(times)
}
