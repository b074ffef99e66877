//! The RFFT training loop: the trainable part (the whole ControlNet or LoRA adapters), AdamW
//! with gradient accumulation, evaluations, atomic checkpoints and exact resume.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use burn::backend::Autodiff;
use burn::module::{AutodiffModule, Module, ModuleVisitor, Param};
use burn::optim::{AdamWConfig, GradientsAccumulator, GradientsParams, Optimizer};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{DType, Tensor};
use serde::{Deserialize, Serialize};

use super::config::{ResolvedModels, RfftConfig};
use super::error::{RfftError, io_err};
use crate::train::run_folder::{
    RfftEvent, RunFiles, RunState, RunStatus, StepMetrics, append_metric, latest_checkpoint, load_module, load_record, remove_checkpoints,
    read_json, save_module, save_record, truncate_metrics, write_checkpoint, write_json,
};
use super::session::Session;
use crate::models::controlnet::ControlNetModel;
use crate::models::lora::{LoraAdapters, LoraTarget, lora_targets};
use crate::files::write_atomic;
use crate::pipeline::sd::load_controlnet;

/// Pause / stop between iterations, shared between a running loop and its job handle.
#[derive(Clone, Debug, Default)]
pub struct RunControl {
    paused: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
}

impl RunControl {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn pause(&self) {
        self.paused.store(true, Ordering::SeqCst);
    }
    pub fn resume(&self) {
        self.paused.store(false, Ordering::SeqCst);
    }
    /// Finish the current iteration, write a checkpoint, end with status "stopped".
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }
    pub fn is_paused(&self) -> bool {
        self.paused.load(Ordering::SeqCst)
    }
    pub fn is_stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }
}

/// What the LoRA adapters of a run were built on (`checkpoint/lora.json`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LoraInfo {
    pub rank: usize,
    pub scale: f32,
    pub targets: Vec<LoraTarget>,
}

/// Sum of squared gradients of a module's parameters, accumulated on the device in f32 (one
/// readback per step instead of one per parameter tensor: a host sync each, hundreds for a full
/// ControlNet).
struct GradNorm<'a, B: AutodiffBackend> {
    grads: &'a GradientsParams,
    sum: Option<Tensor<B::InnerBackend, 1>>,
}

impl<B: AutodiffBackend> GradNorm<'_, B> {
    /// The total, read back once (0 when no parameter has a gradient).
    fn total(self) -> f64 {
        self.sum.map_or(0.0, scalar)
    }
}

impl<B: AutodiffBackend> ModuleVisitor<B> for GradNorm<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if let Some(g) = self.grads.get::<B::InnerBackend, D>(param.id) {
            let s = g.cast(burn::tensor::FloatDType::F32).powf_scalar(2.0).sum();
            self.sum = Some(match self.sum.take() {
                Some(acc) => acc + s,
                None => s,
            });
        }
    }
}

trait ElemF32 {
    fn elem_f32(self) -> f32;
}
impl<E: burn::tensor::ElementConversion> ElemF32 for E {
    fn elem_f32(self) -> f32 {
        self.elem::<f32>()
    }
}

fn scalar<B: Backend>(t: Tensor<B, 1>) -> f64 {
    t.into_scalar().elem_f32() as f64
}

/// The part of the ControlNet being trained.
pub trait Trainable<AB: AutodiffBackend>: AutodiffModule<AB> + Clone {
    /// The ControlNet to run this step (with gradients flowing to `self`).
    fn controlnet(&self, reference: &ControlNetModel<AB>) -> ControlNetModel<AB>;
}

impl<AB: AutodiffBackend> Trainable<AB> for ControlNetModel<AB> {
    fn controlnet(&self, _reference: &ControlNetModel<AB>) -> ControlNetModel<AB> {
        self.clone()
    }
}

/// LoRA adapters with their targets (the targets are plain data, not parameters).
#[derive(Module, Debug)]
pub struct LoraControlNet<B: Backend> {
    pub adapters: LoraAdapters<B>,
    #[module(skip)]
    pub info: LoraInfo,
}

impl<AB: AutodiffBackend> Trainable<AB> for LoraControlNet<AB> {
    fn controlnet(&self, reference: &ControlNetModel<AB>) -> ControlNetModel<AB> {
        self.adapters.merged(reference, &self.info.targets, self.info.scale)
    }
}

/// Train (or resume) in `run`. Events go to `emit`; `control` pauses/stops.
pub fn train<B: Backend>(
    config: &RfftConfig,
    models: &ResolvedModels,
    run: &Path,
    resume: bool,
    dtype: DType,
    device: &B::Device,
    control: &RunControl,
    memory: fn() -> Option<u64>,
    emit: &mut dyn FnMut(&RfftEvent),
) -> Result<RunStatus, RfftError> {
    if config.checkpointing {
        type AB<B> = Autodiff<B, burn::backend::autodiff::checkpoint::strategy::BalancedCheckpointing>;
        train_ad::<AB<B>>(config, models, run, resume, dtype, device, control, memory, emit)
    } else {
        train_ad::<Autodiff<B>>(config, models, run, resume, dtype, device, control, memory, emit)
    }
}

#[allow(clippy::too_many_arguments)]
fn train_ad<AB: AutodiffBackend>(
    config: &RfftConfig,
    models: &ResolvedModels,
    run: &Path,
    resume: bool,
    dtype: DType,
    device: &AB::Device,
    control: &RunControl,
    memory: fn() -> Option<u64>,
    emit: &mut dyn FnMut(&RfftEvent),
) -> Result<RunStatus, RfftError> {
    std::fs::create_dir_all(run).map_err(|e| io_err(run, e))?;
    AB::seed(device, config.seed);
    let session = Session::<AB>::load(config, models, dtype, device)?;
    if config.lora_rank == 0 {
        let cn = session.reference.clone().map(&mut RequireGrad);
        run_loop(&session, cn, None, run, resume, control, memory, emit)
    } else {
        let targets = lora_targets::<AB, _>(&session.reference);
        let info = LoraInfo {
            rank: config.lora_rank,
            scale: config.lora_scale(),
            targets,
        };
        let adapters = LoraControlNet {
            adapters: LoraAdapters::init(&info.targets, info.rank, device),
            info: info.clone(),
        };
        run_loop(&session, adapters, Some(&info), run, resume, control, memory, emit)
    }
}

/// Marks every parameter as trainable (the ControlNet was loaded frozen as the reference).
pub(crate) struct RequireGrad;

impl<B: Backend> burn::module::ModuleMapper<B> for RequireGrad {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (id, t, mapper) = param.consume();
        Param::from_mapped_value(id, t.detach().require_grad(), mapper)
    }
}

#[allow(clippy::too_many_arguments)]
fn run_loop<AB: AutodiffBackend, M: Trainable<AB>>(
    session: &Session<AB>,
    mut trainable: M,
    lora: Option<&LoraInfo>,
    run: &Path,
    resume: bool,
    control: &RunControl,
    memory: fn() -> Option<u64>,
    emit: &mut dyn FnMut(&RfftEvent),
) -> Result<RunStatus, RfftError> {
    let config = &session.config;
    let device = &session.device;
    let mut optim = AdamWConfig::new()
        .with_weight_decay(config.weight_decay as f32)
        .init::<AB, M>();
    let metrics = RunFiles::metrics(run);
    let mut step = 0usize;
    let checkpoint = if resume { resumable_checkpoint(run, config, lora.is_some())? } else { None };
    if let Some(ck) = checkpoint {
        trainable = load_module(&ck, "trainable", trainable, device)?;
        optim = optim.load_record(load_record(&ck, "optimizer", device)?);
        step = RunState::read(&ck)?.step;
        truncate_metrics(&metrics, step)?;
    } else {
        let _ = std::fs::remove_file(&metrics);
        remove_checkpoints(run);
        let _ = std::fs::remove_dir_all(RunFiles::eval_dir(run));
    }
    let toml = config.absolutized().to_toml()?;
    let config_path = RunFiles::rfft_config(run);
    write_atomic(&config_path, toml.as_bytes()).map_err(|e| io_err(&config_path, e))?;
    let mut state = RunState::new(step, RunStatus::Running);
    state.write(run)?;
    let evaluate = |m: &M, step: usize, emit: &mut dyn FnMut(&RfftEvent)| -> Result<(), RfftError> {
        if session.eval_products.is_empty() {
            return Ok(());
        }
        let cn = m.controlnet(&session.reference).valid();
        let ev = RfftEvent::Eval(session.evaluate(&cn, step, run)?);
        append_metric(&metrics, &ev)?;
        emit(&ev);
        Ok(())
    };
    if step == 0 {
        evaluate(&trainable, 0, emit)?;
    }
    let mut last_checkpoint = step;
    let mut stopped = false;
    while step < config.steps {
        // pause between iterations
        if control.is_paused() && !control.is_stopped() {
            state.status = RunStatus::Paused;
            state.write(run)?;
            emit(&RfftEvent::Paused { step });
            while control.is_paused() && !control.is_stopped() {
                std::thread::sleep(Duration::from_millis(50));
            }
            state.status = RunStatus::Running;
            state.write(run)?;
            emit(&RfftEvent::Resumed { step });
        }
        if control.is_stopped() {
            stopped = true;
            break;
        }
        let start = Instant::now();
        let cn = trainable.controlnet(&session.reference);
        let cn_inner = cn.valid();
        let mut accum = GradientsAccumulator::<M>::new();
        let (mut f_ac, mut reg, mut total) = (0.0, 0.0, 0.0);
        for micro in 0..config.grad_accum {
            let (idx, seeds, k) = session.draw(step, micro);
            let (obj, grads) = session.forward_backward(&cn, &cn_inner, &idx, &seeds, k)?;
            f_ac += scalar(obj.f_ac);
            reg += scalar(obj.reg);
            total += scalar(obj.total);
            accum.accumulate(&trainable, GradientsParams::from_grads(grads, &trainable));
        }
        let grads = accum.grads();
        let grad_sq = {
            let mut norm = GradNorm::<AB> { grads: &grads, sum: None };
            trainable.visit(&mut norm);
            norm.total()
        };
        let k = config.grad_accum as f64;
        if !(total.is_finite() && grad_sq.is_finite()) {
            return Err(RfftError::Train(format!(
                "step {}: the loss or the gradients are not finite (total {total}); try a lower lr or --dtype f32",
                step + 1
            )));
        }
        trainable = optim.step(config.lr, trainable, grads);
        step += 1;
        let sampled = crate::train::memory::sample(device);
        let ev = RfftEvent::Step(StepMetrics {
            step,
            f_ac: f_ac / k,
            reg: reg / k,
            total: total / k,
            grad_norm: grad_sq.sqrt(),
            step_time_s: start.elapsed().as_secs_f64(),
            memory_bytes: memory(),
            lr: config.lr,
            time: Some(crate::train::run_folder::unix_seconds()),
            resident_bytes: sampled.resident_bytes,
            device_bytes: sampled.device_bytes,
        });
        append_metric(&metrics, &ev)?;
        emit(&ev);
        state.step = step;
        state.write(run)?;
        if step % config.eval_every == 0 || step == config.steps {
            evaluate(&trainable, step, emit)?;
        }
        if step % config.checkpoint_every == 0 || step == config.steps || control.is_stopped() {
            save_checkpoint(run, &trainable, &optim, lora, step)?;
            last_checkpoint = step;
            emit(&RfftEvent::Checkpoint {
                step,
                dir: RunFiles::checkpoint(run),
            });
        }
    }
    if last_checkpoint != step {
        save_checkpoint(run, &trainable, &optim, lora, step)?;
        emit(&RfftEvent::Checkpoint {
            step,
            dir: RunFiles::checkpoint(run),
        });
    }
    state = RunState::new(
        step,
        if stopped || (control.is_stopped() && step < config.steps) {
            RunStatus::Stopped
        } else {
            RunStatus::Finished
        },
    );
    state.write(run)?;
    emit(&RfftEvent::Finished {
        step,
        status: state.status,
    });
    Ok(state.status)
}

/// The configuration that continues `run` as it was: its own `run.toml`, read and validated.
/// `rfft --resume` without `--config` and the studio's Resume run both start from it (and
/// `train` with `resume` then checks the checkpoint against it).
pub fn resume_config(run: &Path) -> Result<RfftConfig, RfftError> {
    let path = RunFiles::rfft_config(run);
    if !path.is_file() {
        return Err(RfftError::Config(format!(
            "{}: nothing to resume: not an RFFT run folder (no run.toml)",
            run.display()
        )));
    }
    RfftConfig::from_file(&path)
}

/// The checkpoint `--resume` continues from, after checking that it can: `None` when the run
/// ended before its first checkpoint (it starts again from step 0, with a warning); an error
/// when the folder is not a run, or when the configuration differs from the run's own in more
/// than `RESUMABLE_CHANGES` (each difference named), or when the checkpoint holds the other kind
/// of trainable (full ControlNet vs LoRA adapters).
fn resumable_checkpoint(run: &Path, config: &RfftConfig, lora: bool) -> Result<Option<PathBuf>, RfftError> {
    let run_toml = run.join("run.toml");
    let Ok(text) = std::fs::read_to_string(&run_toml) else {
        return Err(RfftError::Config(format!(
            "{}: nothing to resume: not an RFFT run folder (no run.toml)",
            run.display()
        )));
    };
    let started: RfftConfig = toml::from_str(&text)
        .map_err(|e| RfftError::Config(format!("{}: the run's configuration is unreadable: {e}", run_toml.display())))?;
    let changes = started.changes_to(&config.absolutized());
    let refused: Vec<String> = changes
        .iter()
        .filter(|(key, ..)| !super::config::RESUMABLE_CHANGES.contains(&key.as_str()))
        .map(|(key, was, now)| format!("{key}: {was} -> {now}"))
        .collect();
    if !refused.is_empty() {
        return Err(RfftError::Config(format!(
            "{}: resuming with a different configuration would make it another experiment ({}); resume without --config to continue it as it was, or start a new run folder (only {} may change)",
            run.display(),
            refused.join("; "),
            super::config::RESUMABLE_CHANGES.join(", ")
        )));
    }
    for (key, was, now) in &changes {
        tracing::warn!("resuming {} with {key} = {now} (was {was})", run.display());
    }
    let Some(ck) = latest_checkpoint(run, TRAINABLE_FILE) else {
        tracing::warn!(
            "{}: the run ended before its first checkpoint; starting it again from step 0",
            run.display()
        );
        return Ok(None);
    };
    let has_lora = ck.join("lora.json").is_file();
    if has_lora != lora {
        let kind = |l: bool| if l { "LoRA adapters" } else { "the full ControlNet" };
        return Err(RfftError::Config(format!(
            "{}: the checkpoint holds {}, the configuration trains {}",
            ck.display(),
            kind(has_lora),
            kind(lora)
        )));
    }
    Ok(Some(ck))
}

/// The file that marks a complete RFFT checkpoint (the ControlNet or the LoRA adapters).
const TRAINABLE_FILE: &str = RunFiles::RFFT_TRAINABLE;

/// Write the run's checkpoint: the trainable part, the optimizer state, the LoRA description
/// (LoRA runs) and the step, replacing the previous checkpoint atomically.
fn save_checkpoint<AB: AutodiffBackend, M: Trainable<AB>, O: Optimizer<M, AB>>(
    run: &Path,
    trainable: &M,
    optim: &O,
    lora: Option<&LoraInfo>,
    step: usize,
) -> Result<(), RfftError> {
    write_checkpoint(run, |dir| -> Result<(), RfftError> {
        save_module(dir, "trainable", trainable)?;
        save_record::<AB, _>(dir, "optimizer", optim.to_record())?;
        if let Some(info) = lora {
            write_json(&dir.join("lora.json"), info)?;
        }
        RunState::new(step, RunStatus::Running).write(dir)?;
        Ok(())
    })?;
    Ok(())
}

/// The fine-tuned ControlNet of a run's checkpoint (LoRA adapters merged), on backend `B`.
pub fn load_finetuned<B: Backend>(run: &Path, models: &ResolvedModels, dtype: DType, device: &B::Device) -> Result<ControlNetModel<B>, RfftError> {
    let ck = latest_checkpoint(run, TRAINABLE_FILE)
        .ok_or_else(|| RfftError::Config(format!("{}: no checkpoint in this run folder", run.display())))?;
    let base = load_controlnet::<B>(&models.controlnet, dtype, device)
        .map_err(|e| RfftError::Models(format!("ControlNet {}: {e}", models.controlnet.display())))?;
    let lora = ck.join("lora.json");
    if !lora.is_file() {
        return Ok(load_module(&ck, "trainable", base, device)?);
    }
    let (adapters, info) = load_lora_adapters::<B>(&ck, device)?;
    Ok(adapters.merged(&base, &info.targets, info.scale))
}

/// The LoRA factors of a LoRA run's latest checkpoint (`None` for a full fine-tune).
pub fn load_finetuned_lora<B: Backend>(run: &Path, device: &B::Device) -> Result<Option<(LoraAdapters<B>, LoraInfo)>, RfftError> {
    let ck = latest_checkpoint(run, TRAINABLE_FILE)
        .ok_or_else(|| RfftError::Config(format!("{}: no checkpoint in this run folder", run.display())))?;
    if !ck.join("lora.json").is_file() {
        return Ok(None);
    }
    Ok(Some(load_lora_adapters::<B>(&ck, device)?))
}

fn load_lora_adapters<B: Backend>(ck: &Path, device: &B::Device) -> Result<(LoraAdapters<B>, LoraInfo), RfftError> {
    let info: LoraInfo = read_json(&ck.join("lora.json"), "LoRA description (lora.json)")?;
    let module = LoraControlNet {
        adapters: LoraAdapters::<B>::init(&info.targets, info.rank, device),
        info: info.clone(),
    };
    let module = load_module(ck, "trainable", module, device)?;
    Ok((module.adapters, info))
}
