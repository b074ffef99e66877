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
use burn::tensor::{DType, Tensor, TensorPrimitive};
use serde::{Deserialize, Serialize};

use super::config::{ResolvedModels, RfftConfig};
use super::error::{RfftError, io_err};
use crate::train::run_folder::{
    RfftEvent, RunFiles, RunState, RunStatus, StepMetrics, append_metric, latest_checkpoint, load_module, load_record, remove_checkpoints,
    read_json, save_module, save_record, truncate_metrics, write_checkpoint, write_json,
};
use super::session::Session;
use crate::device::{Agreed, Gate, Peer, Peers, Vote};
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

/// Train (or resume) in `run` on one device. Events go to `emit`; `control` pauses/stops.
#[allow(clippy::too_many_arguments)]
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
    let ctx = RunContext { config, models, run, resume, dtype, control, memory, devices: None };
    if config.checkpointing {
        type AB<B> = Autodiff<B, burn::backend::autodiff::checkpoint::strategy::BalancedCheckpointing>;
        train_ad::<AB<B>>(&ctx, device, emit)
    } else {
        train_ad::<Autodiff<B>>(&ctx, device, emit)
    }
}

/// Train (or resume) in `run` on several devices at once (data parallel): every peer holds the
/// whole trainable part and takes its share of each step's `grad_accum` micro-batches; the
/// gradients are summed over the peers and every peer applies the same AdamW step, so the run
/// follows the one-device run with the same configuration (same global batch) up to float
/// summation order. Rank 0 writes the run folder, evaluates and emits events, exactly as a
/// one-device run does.
#[allow(clippy::too_many_arguments)]
pub fn train_on_peers<B: Backend>(
    config: &RfftConfig,
    models: &ResolvedModels,
    run: &Path,
    resume: bool,
    dtype: DType,
    peers: Peers<B>,
    control: &RunControl,
    memory: fn() -> Option<u64>,
    emit: &mut dyn FnMut(&RfftEvent),
) -> Result<RunStatus, RfftError> {
    let world = peers.len();
    if world == 0 || config.grad_accum % world != 0 {
        return Err(RfftError::Config(format!(
            "grad_accum = {} cannot be shared evenly by {world} devices: set grad_accum to a multiple of {world} (each step's global batch is batch x grad_accum, whatever the number of devices)",
            config.grad_accum
        )));
    }
    let devices = Some(peers.set.to_string());
    let ctx = RunContext { config, models, run, resume, dtype, control, memory, devices };
    if config.checkpointing {
        type AB<B> = Autodiff<B, burn::backend::autodiff::checkpoint::strategy::BalancedCheckpointing>;
        train_peers_ad::<B, AB<B>>(&ctx, peers, emit)
    } else {
        train_peers_ad::<B, Autodiff<B>>(&ctx, peers, emit)
    }
}

/// What every peer of a run shares (read-only).
struct RunContext<'a> {
    config: &'a RfftConfig,
    models: &'a ResolvedModels,
    run: &'a Path,
    resume: bool,
    dtype: DType,
    control: &'a RunControl,
    memory: fn() -> Option<u64>,
    /// The device list of a data-parallel run, recorded in `state.json`.
    devices: Option<String>,
}

impl RunContext<'_> {
    /// The run's state as the leader writes it.
    fn state(&self, step: usize, status: RunStatus) -> RunState {
        RunState {
            devices: self.devices.clone(),
            ..RunState::new(step, status)
        }
    }

    /// Create the run folder and find the checkpoint a resume continues from (checked once,
    /// before any peer starts).
    fn prepare(&self) -> Result<Option<PathBuf>, RfftError> {
        std::fs::create_dir_all(self.run).map_err(|e| io_err(self.run, e))?;
        if self.resume {
            resumable_checkpoint(self.run, self.config, self.config.lora_rank > 0)
        } else {
            Ok(None)
        }
    }
}

/// The trainable part at step 0: the reference ControlNet made trainable, or fresh LoRA
/// adapters (random, from the run's seed) with their description.
fn initial_trainable<AB: AutodiffBackend>(session: &Session<AB>) -> (Initial<AB>, Option<LoraInfo>) {
    let config = &session.config;
    if config.lora_rank == 0 {
        (Initial::Full(session.reference.clone().map(&mut RequireGrad)), None)
    } else {
        let targets = lora_targets::<AB, _>(&session.reference);
        let info = LoraInfo {
            rank: config.lora_rank,
            scale: config.lora_scale(),
            targets,
        };
        let adapters = LoraControlNet {
            adapters: LoraAdapters::init(&info.targets, info.rank, config.seed, &session.device),
            info: info.clone(),
        };
        (Initial::Lora(adapters), Some(info))
    }
}

/// Where a data-parallel peer's initial weights come from: the leader builds them and sends
/// them to the others, which receive them.
enum Start<AB: AutodiffBackend> {
    Build(Vec<std::sync::mpsc::Sender<(Initial<AB>, Option<LoraInfo>)>>),
    Receive(std::sync::mpsc::Receiver<(Initial<AB>, Option<LoraInfo>)>),
}

/// [`initial_trainable`]'s two kinds.
#[derive(Clone)]
enum Initial<AB: AutodiffBackend> {
    Full(ControlNetModel<AB>),
    Lora(LoraControlNet<AB>),
}

impl<AB: AutodiffBackend> Initial<AB> {
    fn fork(self, device: &AB::Device) -> Self {
        match self {
            Initial::Full(m) => Initial::Full(m.fork(device)),
            Initial::Lora(m) => Initial::Lora(m.fork(device)),
        }
    }

    /// Train it: [`run_loop`] for its kind.
    fn run(self, lp: &LoopParts<'_, AB>, emit: &mut dyn FnMut(&RfftEvent)) -> Result<RunStatus, RfftError> {
        match self {
            Initial::Full(m) => run_loop(lp, m, emit),
            Initial::Lora(m) => run_loop(lp, m, emit),
        }
    }
}

fn train_ad<AB: AutodiffBackend>(ctx: &RunContext<'_>, device: &AB::Device, emit: &mut dyn FnMut(&RfftEvent)) -> Result<RunStatus, RfftError> {
    let checkpoint = ctx.prepare()?;
    AB::seed(device, ctx.config.seed);
    let session = Session::<AB>::load(ctx.config, ctx.models, ctx.dtype, device)?;
    let (initial, lora) = initial_trainable(&session);
    let lp = LoopParts {
        session: &session,
        lora: lora.as_ref(),
        checkpoint: checkpoint.as_deref(),
        ctx,
        peer: None,
    };
    initial.run(&lp, emit)
}

fn train_peers_ad<B: Backend, AB: AutodiffBackend<InnerBackend = B, Device = B::Device>>(
    ctx: &RunContext<'_>,
    peers: Peers<B>,
    emit: &mut dyn FnMut(&RfftEvent),
) -> Result<RunStatus, RfftError> {
    let checkpoint = ctx.prepare()?;
    let checkpoint = checkpoint.as_deref();
    let gate = Gate::new(peers.len());
    let mut all = peers.split().into_iter();
    let Some(leader) = all.next() else {
        return Err(RfftError::Config("no device to train on".into()));
    };
    let followers: Vec<Peer<B>> = all.collect();
    let gate = &gate;
    // A peer that ends with an error leaves the gate, so no other peer waits for it.
    let finish = |peer: &Peer<B>, result: std::thread::Result<Result<RunStatus, RfftError>>| {
        let result = result.unwrap_or_else(|p| Err(RfftError::Panicked(crate::device::panic_message(p.as_ref()))));
        if let Err(e) = &result {
            gate.leave(peer.rank, format!("{}: {}", peer.label, crate::errors::render_chain(e)));
        }
        result
    };
    // One peer's whole run; the leader builds the initial weights and shares them, so that
    // every peer starts from the same ones.
    let body = |peer: &Peer<B>, start: Start<AB>, emit: &mut dyn FnMut(&RfftEvent)| -> Result<RunStatus, RfftError> {
        peer.enter(|| {
            peer.join()?;
            if matches!(start, Start::Build(_)) {
                AB::seed(&peer.device, ctx.config.seed);
            }
            let session = Session::<AB>::load(ctx.config, ctx.models, ctx.dtype, &peer.device)?;
            let (initial, lora) = match start {
                Start::Build(followers) => {
                    let (initial, lora) = initial_trainable(&session);
                    for tx in followers {
                        let _ = tx.send((initial.clone(), lora.clone()));
                    }
                    (initial, lora)
                }
                Start::Receive(rx) => {
                    let (initial, lora) = rx
                        .recv()
                        .map_err(|_| RfftError::PeerFailed("the first device ended before sharing the initial weights".into()))?;
                    (initial.fork(&peer.device), lora)
                }
            };
            let lp = LoopParts {
                session: &session,
                lora: lora.as_ref(),
                checkpoint,
                ctx,
                peer: Some(PeerCtx { peer, gate }),
            };
            initial.run(&lp, emit)
        })
    };
    let body = &body;
    std::thread::scope(|s| {
        let mut senders = Vec::new();
        let mut handles = Vec::new();
        for peer in followers {
            let (tx, rx) = std::sync::mpsc::channel();
            senders.push(tx);
            handles.push(s.spawn(move || {
                let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| body(&peer, Start::Receive(rx), &mut |_| {})));
                (finish(&peer, result), peer.label.clone())
            }));
        }
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| body(&leader, Start::Build(senders), emit)));
        let leader_result = finish(&leader, result);
        // The error to report: the first that is a peer's own, not the echo of another's.
        let mut own: Option<RfftError> = None;
        let mut echo: Option<RfftError> = None;
        let mut status = None;
        let mut note = |r: Result<RunStatus, RfftError>, label: Option<String>| match r {
            Ok(s) => status = status.or(Some(s)),
            Err(e @ RfftError::PeerFailed(_)) => echo = echo.take().or(Some(e)),
            Err(e) => {
                if own.is_none() {
                    own = Some(match label {
                        Some(peer) => RfftError::OnPeer { peer, source: Box::new(e) },
                        None => e,
                    });
                }
            }
        };
        note(leader_result, None);
        for h in handles {
            match h.join() {
                Ok((r, label)) => note(r, Some(label)),
                Err(p) => note(Err(RfftError::Panicked(crate::device::panic_message(p.as_ref()))), None),
            }
        }
        match (own, echo, status) {
            (Some(e), ..) | (None, Some(e), _) => Err(e),
            (None, None, Some(s)) => Ok(s),
            (None, None, None) => Err(RfftError::PeerFailed("no device finished".into())),
        }
    })
}

/// Marks every parameter as trainable (the ControlNet was loaded frozen as the reference).
pub(crate) struct RequireGrad;

impl<B: Backend> burn::module::ModuleMapper<B> for RequireGrad {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (id, t, mapper) = param.consume();
        Param::from_mapped_value(id, t.detach().require_grad(), mapper)
    }
}

/// A peer's place in a data-parallel run: its handle and the gate all peers share.
pub struct PeerCtx<'a, B: Backend> {
    pub peer: &'a Peer<B>,
    pub gate: &'a Gate,
}

impl<B: Backend> PeerCtx<'_, B> {
    fn is_leader(&self) -> bool {
        self.peer.rank == 0
    }

    /// One gate round; a failed round becomes this peer's error.
    fn agree(&self, vote: Vote, values: &[f64]) -> Result<Agreed, RfftError> {
        let agreed = self.gate.agree(self.peer.rank, vote, values);
        if agreed.vote == Vote::Failed {
            return Err(RfftError::PeerFailed(agreed.failure.unwrap_or_else(|| "another device failed".into())));
        }
        Ok(agreed)
    }
}

/// The summed gradients of one step, and the sums of the objective's terms over its
/// micro-batches (over every peer).
pub struct StepGradients {
    pub grads: GradientsParams,
    pub f_ac: f64,
    pub reg: f64,
    pub total: f64,
}

/// The gradients of step `step` (0-based): the micro-batches `0..grad_accum` this peer takes
/// (every `world`-th from its rank; all of them on one device), accumulated, then summed over
/// the peers. Each micro-batch's draws depend only on (seed, step, micro-batch), so a
/// data-parallel step computes the same terms as a one-device step, in another order.
pub fn step_gradients<AB: AutodiffBackend, M: Trainable<AB>>(
    session: &Session<AB>,
    trainable: &M,
    step: usize,
    peer: Option<&PeerCtx<'_, AB::InnerBackend>>,
) -> Result<StepGradients, RfftError> {
    let (rank, world) = peer.map_or((0, 1), |p| (p.peer.rank, p.peer.world));
    let mut accum = GradientsAccumulator::<M>::new();
    let (mut f_ac, mut reg, mut total) = (0.0, 0.0, 0.0);
    for micro in (rank..session.config.grad_accum).step_by(world) {
        // A fresh ControlNet per micro-batch: a backward pass frees the graph it walked, and
        // with LoRA the merge `W + down @ up` is part of that graph, so a ControlNet reused
        // for the next micro-batch would give the adapters no gradient.
        let cn = trainable.controlnet(&session.reference);
        let cn_inner = cn.valid();
        let (idx, seeds, k) = session.draw(step, micro);
        let (obj, grads) = session.forward_backward(&cn, &cn_inner, &idx, &seeds, k)?;
        f_ac += scalar(obj.f_ac);
        reg += scalar(obj.reg);
        total += scalar(obj.total);
        accum.accumulate(trainable, GradientsParams::from_grads(grads, trainable));
    }
    let mut grads = accum.grads();
    if let Some(p) = peer {
        // every peer got here (none waits in a sum for one that failed), then the sums
        let agreed = p.agree(Vote::Continue, &[f_ac, reg, total])?;
        (f_ac, reg, total) = (agreed.sums[0], agreed.sums[1], agreed.sums[2]);
        let mut sum = SumGrads::<AB> {
            grads: &mut grads,
            peer: p.peer,
            error: None,
        };
        trainable.visit(&mut sum);
        if let Some(e) = sum.error {
            return Err(e.into());
        }
    }
    Ok(StepGradients { grads, f_ac, reg, total })
}

/// Replaces each parameter's gradient by its sum over the peers, parameter by parameter in the
/// module's order (the same on every peer, as the sums require). A parameter with no gradient
/// on this peer contributes zeros, so every peer makes the same calls.
struct SumGrads<'a, AB: AutodiffBackend> {
    grads: &'a mut GradientsParams,
    peer: &'a Peer<AB::InnerBackend>,
    error: Option<crate::device::DeviceError>,
}

impl<AB: AutodiffBackend> ModuleVisitor<AB> for SumGrads<'_, AB> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<AB, D>>) {
        if self.error.is_some() {
            return;
        }
        let g = self
            .grads
            .remove::<AB::InnerBackend, D>(param.id)
            .unwrap_or_else(|| param.val().inner().zeros_like());
        match self.peer.sum(g.into_primitive().tensor()) {
            Ok(t) => self.grads.register::<AB::InnerBackend, D>(param.id, Tensor::from_primitive(TensorPrimitive::Float(t))),
            Err(e) => self.error = Some(e),
        }
    }
}

/// What one training loop (one device, or one peer of several) works with.
struct LoopParts<'a, AB: AutodiffBackend> {
    session: &'a Session<AB>,
    lora: Option<&'a LoraInfo>,
    /// The checkpoint a resume starts from.
    checkpoint: Option<&'a Path>,
    ctx: &'a RunContext<'a>,
    peer: Option<PeerCtx<'a, AB::InnerBackend>>,
}

/// The loop. On several devices every peer runs it in step; only the leader (rank 0, or the
/// only device) touches the run folder, evaluates, reads `control` and emits events.
fn run_loop<AB: AutodiffBackend, M: Trainable<AB>>(lp: &LoopParts<'_, AB>, mut trainable: M, emit: &mut dyn FnMut(&RfftEvent)) -> Result<RunStatus, RfftError> {
    let (session, lora, run, control, memory) = (lp.session, lp.lora, lp.ctx.run, lp.ctx.control, lp.ctx.memory);
    let peer = lp.peer.as_ref();
    let leader = peer.is_none_or(PeerCtx::is_leader);
    let config = &session.config;
    let device = &session.device;
    let mut optim = AdamWConfig::new()
        .with_weight_decay(config.weight_decay as f32)
        .init::<AB, M>();
    let metrics = RunFiles::metrics(run);
    let mut step = 0usize;
    if let Some(ck) = lp.checkpoint {
        trainable = load_module(ck, "trainable", trainable, device)?;
        optim = optim.load_record(load_record(ck, "optimizer", device)?);
        step = RunState::read(ck)?.step;
    }
    let mut state = lp.ctx.state(step, RunStatus::Running);
    if leader {
        if lp.checkpoint.is_some() {
            truncate_metrics(&metrics, step)?;
        } else {
            let _ = std::fs::remove_file(&metrics);
            remove_checkpoints(run);
            let _ = std::fs::remove_dir_all(RunFiles::eval_dir(run));
        }
        let toml = config.absolutized().to_toml()?;
        let config_path = RunFiles::rfft_config(run);
        write_atomic(&config_path, toml.as_bytes()).map_err(|e| io_err(&config_path, e))?;
        state.write(run)?;
    }
    let evaluate = |m: &M, step: usize, emit: &mut dyn FnMut(&RfftEvent)| -> Result<(), RfftError> {
        if !leader || session.eval_products.is_empty() {
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
        // pause between iterations (the other peers wait at the gate meanwhile)
        if leader && control.is_paused() && !control.is_stopped() {
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
        let stop_here = leader && control.is_stopped();
        let stop_here = match peer {
            Some(p) => p.agree(if stop_here { Vote::Stop } else { Vote::Continue }, &[])?.vote == Vote::Stop,
            None => stop_here,
        };
        if stop_here {
            stopped = true;
            break;
        }
        let start = Instant::now();
        let StepGradients { grads, f_ac, reg, total } = step_gradients(session, &trainable, step, peer)?;
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
        if !leader {
            continue;
        }
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
    let status = if stopped || (leader && control.is_stopped() && step < config.steps) {
        RunStatus::Stopped
    } else {
        RunStatus::Finished
    };
    if !leader {
        return Ok(status);
    }
    if last_checkpoint != step {
        save_checkpoint(run, &trainable, &optim, lora, step)?;
        emit(&RfftEvent::Checkpoint {
            step,
            dir: RunFiles::checkpoint(run),
        });
    }
    state = lp.ctx.state(step, status);
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
        adapters: LoraAdapters::<B>::init(&info.targets, info.rank, 0, device),
        info: info.clone(),
    };
    let module = load_module(ck, "trainable", module, device)?;
    Ok((module.adapters, info))
}
