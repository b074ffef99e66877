//! Running RFFT as a job: the backend job the CLI dispatches (`TrainJob`) and the GUI's worker
//! thread (`spawn_rfft`), paused and stopped through the loop's `RunControl`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};

use burn::tensor::backend::Backend;

use super::config::{ResolvedModels, RfftConfig};
use super::error::RfftError;
use crate::device::peak_rss_bytes;
use crate::train::run_folder::{RfftEvent, RunState, RunStatus};
use super::trainer::{RunControl, train, train_on_peers};
use crate::device::{BackendJob, BackendKind, DeviceRequest, DeviceSet, Peers, PeersJob, Precision};

/// How many copies of a run the host's memory holds: one per CPU peer, else one (GPUs hold
/// their own).
pub fn cpu_peers(devices: Option<&DeviceSet>) -> u64 {
    devices.filter(|d| d.backend == BackendKind::Cpu).map_or(1, |d| d.len() as u64)
}

/// A running RFFT job on a worker thread.
pub struct RfftJob {
    pub events: Receiver<RfftEvent>,
    control: RunControl,
    finished: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RfftJob {
    pub fn pause(&self) {
        self.control.pause();
    }
    pub fn resume(&self) {
        self.control.resume();
    }
    /// Finish the current iteration, write a checkpoint, end with status "stopped".
    pub fn stop(&self) {
        self.control.stop();
    }
    /// The worker has ended (its last event was `Finished` or `Failed`).
    pub fn is_finished(&self) -> bool {
        self.finished.load(Ordering::SeqCst)
    }
    /// Wait for the worker thread.
    pub fn join(mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Runs `train` on the selected backend.
pub struct TrainJob {
    pub config: RfftConfig,
    pub models: ResolvedModels,
    pub run: PathBuf,
    pub resume: bool,
    pub precision: Precision,
    pub control: RunControl,
    pub memory: fn() -> Option<u64>,
    pub emit: Box<dyn FnMut(&RfftEvent) + Send>,
}

impl TrainJob {
    /// A failed run says why in its state file (the studio's run list and `--resume` read it).
    fn record_failure(&self, result: Result<RunStatus, RfftError>) -> Result<RunStatus, RfftError> {
        if let Err(e) = &result {
            let (step, devices) = RunState::read(&self.run).map_or((0, None), |s| (s.step, s.devices));
            let _ = RunState {
                error: Some(e.to_string()),
                devices,
                ..RunState::new(step, RunStatus::Failed)
            }
            .write(&self.run);
        }
        result
    }
}

impl BackendJob for TrainJob {
    type Output = Result<RunStatus, RfftError>;
    fn run<B: Backend>(mut self, device: B::Device) -> Self::Output {
        let result = train::<B>(
            &self.config,
            &self.models,
            &self.run,
            self.resume,
            self.precision.dtype(),
            &device,
            &self.control,
            self.memory,
            &mut *self.emit,
        );
        self.record_failure(result)
    }
}

/// The same run on several devices (`rfft --devices`).
impl PeersJob for TrainJob {
    type Output = Result<RunStatus, RfftError>;
    fn run<B: Backend>(mut self, peers: Peers<B>) -> Self::Output {
        let result = train_on_peers::<B>(
            &self.config,
            &self.models,
            &self.run,
            self.resume,
            self.precision.dtype(),
            peers,
            &self.control,
            self.memory,
            &mut *self.emit,
        );
        self.record_failure(result)
    }
}

/// Model folders for a config: its `models` entries, else the default manifest's roles.
pub fn resolve_models(config: &RfftConfig, manifest_dir: &Path) -> Result<ResolvedModels, RfftError> {
    let manifest = crate::models::manifest::Manifest::load(manifest_dir).ok();
    let lookup = |role: &str| -> Option<PathBuf> {
        let m = manifest.as_ref()?;
        let role = crate::models::manifest::Role::ALL.iter().find(|r| r.name() == role)?;
        m.path(*role).map(Path::to_path_buf)
    };
    config.models.resolve(&lookup)
}

/// Start (or resume) an RFFT run on a worker thread. Model folders come from the config's
/// `models` table, else from `models/models.toml`.
pub fn spawn_rfft(config: RfftConfig, run_dir: PathBuf, resume: bool, device: DeviceRequest, precision: Precision) -> RfftJob {
    spawn_rfft_with(config, run_dir, resume, device, None, precision, PathBuf::from("models"))
}

/// `spawn_rfft` with another manifest folder, on `devices` (data parallel) when given instead
/// of `device`.
pub fn spawn_rfft_with(
    config: RfftConfig,
    run_dir: PathBuf,
    resume: bool,
    device: DeviceRequest,
    devices: Option<DeviceSet>,
    precision: Precision,
    manifest_dir: PathBuf,
) -> RfftJob {
    let (tx, rx): (Sender<RfftEvent>, Receiver<RfftEvent>) = channel();
    let control = RunControl::new();
    let finished = Arc::new(AtomicBool::new(false));
    let (ctl, fin) = (control.clone(), finished.clone());
    let thread = std::thread::spawn(move || {
        // Whatever happens below (a panic included), the job reads as finished afterwards.
        struct Finished(Arc<AtomicBool>);
        impl Drop for Finished {
            fn drop(&mut self) {
                self.0.store(true, Ordering::SeqCst);
            }
        }
        let _finished = Finished(fin);
        let fail = |tx: &Sender<RfftEvent>, error: RfftError| {
            let error = crate::errors::render_chain(&error);
            let _ = RunState {
                error: Some(error.clone()),
                ..RunState::new(0, RunStatus::Failed)
            }
            .write(&run_dir);
            let _ = tx.send(RfftEvent::Failed { step: 0, error });
        };
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| -> Result<(), RfftError> {
            config.validate().map_err(|e| RfftError::Config(format!("run.toml: {e}")))?;
            let models = resolve_models(&config, &manifest_dir)?;
            let selection = match &devices {
                Some(set) => crate::device::select_set(set, crate::models::policy::AttentionImpl::Auto)?,
                None => crate::device::select(device)?,
            };
            crate::pipeline::params::check_memory(
                &format!("an RFFT iteration at image_size = {} with batch = {}", config.image_size, config.batch),
                config.memory_bytes(precision.element_bytes()) * cpu_peers(devices.as_ref()),
                crate::device::memory_budget_bytes(&selection),
            )?;
            let memory: fn() -> Option<u64> = if selection.backend == crate::device::BackendKind::Cpu {
                peak_rss_bytes
            } else {
                || None
            };
            let events = tx.clone();
            let job = TrainJob {
                config: config.clone(),
                models,
                run: run_dir.clone(),
                resume,
                precision,
                control: ctl,
                memory,
                emit: Box::new(move |e: &RfftEvent| {
                    let _ = events.send(e.clone());
                }),
            };
            let outcome = match &devices {
                Some(set) => crate::device::dispatch_peers(&selection, set, precision, job),
                None => crate::device::dispatch(&selection, precision, job),
            };
            match outcome {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => {
                    let step = RunState::read(&run_dir).map_or(0, |s| s.step);
                    let _ = tx.send(RfftEvent::Failed { step, error: e.to_string() });
                    Ok(())
                }
                Err(e) => Err(e.into()),
            }
        }))
        .unwrap_or_else(|p| Err(RfftError::Panicked(crate::device::panic_message(p.as_ref()))));
        if let Err(e) = outcome {
            fail(&tx, e);
        }
    });
    RfftJob {
        events: rx,
        control,
        finished,
        thread: Some(thread),
    }
}
