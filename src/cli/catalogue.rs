//! `rfstudio catalogue submit|status` and `rfstudio worker`: catalogue generation by any number
//! of worker processes, on any machines, through a job queue in PostgreSQL
//! (`data::catalogue`). Each worker loads the models once and generates product after product
//! into a shared output root; `rfstudio generate --batch-file` stays the one-machine way.

use std::time::{Duration, Instant};

use burn::tensor::backend::Backend;
use clap::{Args, Subcommand};

use super::generate::{GenerateArgs, code_of, load_models, model_paths};
use super::{CliError, GlobalArgs, exit, require_roles};
use crate::data::catalogue::{Job, JobQueue, NewJob, QueueError, staging_dir};
use crate::device::{self, BackendJob};
use crate::models::manifest::Role;
use crate::pipeline::generate::{CancelToken, GenError, GenEvent, ModelPaths, run_generation};
use crate::pipeline::run_folder::RunFolder;
use crate::pipeline::score::Scorer;
use crate::tr;

#[derive(Subcommand, Debug)]
pub enum CatalogueCommand {
    /// Queue a catalogue's products in a PostgreSQL database for `rfstudio worker`s to generate
    /// (the same catalogue file and generation options as `generate --batch-file`).
    Submit(SubmitArgs),
    /// Queued, running, done and failed products, each worker's throughput, the failures.
    Status {
        /// The queue's database: a `postgres://` URL.
        #[arg(long)]
        db: String,
        /// Only this catalogue (default: all).
        #[arg(long)]
        name: Option<String>,
    },
}

#[derive(Args, Debug)]
pub struct SubmitArgs {
    /// The queue's database: a `postgres://` URL (password from PGPASSWORD or ~/.pgpass).
    #[arg(long)]
    pub db: String,
    /// The catalogue's name in the queue (default: the batch file's name).
    #[arg(long)]
    pub name: Option<String>,
    #[command(flatten)]
    pub generate: GenerateArgs,
}

#[derive(Args, Debug)]
pub struct WorkerArgs {
    /// The queue's database: a `postgres://` URL.
    #[arg(long)]
    pub db: String,
    /// This worker's name in the queue (default: host name and process id).
    #[arg(long)]
    pub name: Option<String>,
    /// Seconds a claimed product stays with this worker without news (renewed while it
    /// generates); a worker that dies loses its products after this long.
    #[arg(long, default_value_t = 120)]
    pub lease_seconds: i64,
    /// A product whose workers died this many times is marked failed instead of retried.
    #[arg(long, default_value_t = 3)]
    pub max_attempts: i64,
    /// Keep waiting for new products when the queue is empty (default: stop).
    #[arg(long)]
    pub wait: bool,
}

fn queue_err(e: QueueError) -> CliError {
    match e {
        QueueError::Store(crate::data::store::StoreError::BadDatabaseUrl { .. }) => CliError::bad_input(e),
        other => CliError::new(exit::FAILURE, other),
    }
}

pub fn run(global: &GlobalArgs, command: CatalogueCommand) -> Result<(), CliError> {
    match command {
        CatalogueCommand::Submit(a) => {
            let Some(file) = &a.generate.batch_file else {
                return Err(CliError::bad_input(anyhow::anyhow!(
                    "catalogue submit queues a catalogue: give it --batch-file PRODUCTS.jsonl"
                )));
            };
            if !a.generate.loras.is_empty() {
                return Err(CliError::bad_input(anyhow::anyhow!(
                    "--lora is not carried by the queue: install the LoRA in each worker's models instead"
                )));
            }
            let name = a.name.clone().unwrap_or_else(|| {
                file.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "catalogue".into())
            });
            let (items, skipped) = a.generate.items()?;
            for item in &items {
                item.params.validate().map_err(|e| CliError::bad_input(anyhow::Error::from(e)))?;
            }
            let jobs: Vec<NewJob> = items
                .into_iter()
                .map(|i| NewJob {
                    product_id: i.name,
                    product: std::path::absolute(&i.product).unwrap_or(i.product),
                    params: i.params,
                    out_dir: std::path::absolute(&i.out_dir).unwrap_or(i.out_dir),
                })
                .collect();
            let queue = JobQueue::connect(&a.db).map_err(queue_err)?;
            let (added, present) = queue.submit(&name, &jobs).map_err(queue_err)?;
            if global.json {
                println!(
                    "{}",
                    serde_json::json!({"catalogue": name, "queued": added, "already_queued": present, "already_finished": skipped})
                );
            } else {
                println!(
                    "{}",
                    tr!("cli.catalogue_submitted", name = name, added = added, present = present, finished = skipped, db = queue.location())
                );
            }
            Ok(())
        }
        CatalogueCommand::Status { db, name } => {
            let queue = JobQueue::connect(&db).map_err(queue_err)?;
            let s = queue.status(name.as_deref()).map_err(queue_err)?;
            if global.json {
                println!("{}", serde_json::to_string(&s).map_err(anyhow::Error::from)?);
            } else {
                println!(
                    "{}",
                    tr!("cli.catalogue_status", queued = s.queued, running = s.running, done = s.done, failed = s.failed)
                );
                for w in &s.workers {
                    println!("  {}", tr!("cli.catalogue_worker", worker = w.worker, done = w.done, per_hour = format!("{:.0}", w.per_hour)));
                }
                for (product, error) in &s.failures {
                    println!("  {product}: {error}");
                }
            }
            Ok(())
        }
    }
}

/// What one worker did.
#[derive(Debug, Default, serde::Serialize)]
struct WorkerReport {
    done: u64,
    failed: u64,
    /// Products it generated but lost to another worker (its lease lapsed).
    lost: u64,
}

struct Worker {
    paths: ModelPaths,
    queue: JobQueue,
    name: String,
    args: WorkerArgs,
    json: bool,
    precision: device::Precision,
}

impl BackendJob for Worker {
    type Output = Result<WorkerReport, anyhow::Error>;

    fn run<B: Backend>(self, device: B::Device) -> Self::Output {
        let (generator, mut scorer) = load_models::<B>(&self.paths, self.precision, &device)?;
        let mut report = WorkerReport::default();
        loop {
            let Some(job) = self.queue.claim(&self.name, self.args.lease_seconds, self.args.max_attempts)? else {
                if !self.args.wait && self.queue.pending()? == 0 {
                    break;
                }
                // Products still leased to others may come back if their worker dies.
                std::thread::sleep(Duration::from_millis(500));
                continue;
            };
            self.event(&job, "claimed", None);
            remove_stale_staging(&job);
            let staged = staging_dir(&job, &self.name);
            let cancel = CancelToken::new();
            let mut lost = false;
            let mut renewed = Instant::now();
            let renew_every = Duration::from_millis((self.args.lease_seconds.max(1) * 1000 / 3) as u64);
            let mut emit = |_: GenEvent| {
                if renewed.elapsed() >= renew_every {
                    renewed = Instant::now();
                    if !self.queue.renew(job.id, &self.name, self.args.lease_seconds).unwrap_or(false) {
                        lost = true;
                        cancel.cancel();
                    }
                }
            };
            let result = run_generation(
                &generator,
                scorer.as_mut().map(|s| s as &mut dyn Scorer),
                &job.product,
                &job.params,
                &staged,
                &cancel,
                &mut emit,
            );
            match result {
                Ok(mut summary) => {
                    // The summary names the folder the product ends up in.
                    summary.out_dir = job.out_dir.clone();
                    RunFolder::new(&staged).write_summary(&summary)?;
                    if self.queue.finish(&job, &self.name, &staged)? {
                        report.done += 1;
                        self.event(&job, "done", None);
                    } else {
                        report.lost += 1;
                        self.event(&job, "lost", None);
                    }
                }
                Err(GenError::Cancelled) if lost => {
                    let _ = std::fs::remove_dir_all(&staged);
                    report.lost += 1;
                    self.event(&job, "lost", None);
                }
                Err(e) => {
                    let _ = std::fs::remove_dir_all(&staged);
                    let message = e.to_string();
                    self.queue.fail(&job, &self.name, &message)?;
                    report.failed += 1;
                    self.event(&job, "failed", Some((code_of(&e), &message)));
                }
            }
        }
        Ok(report)
    }
}

impl Worker {
    fn event(&self, job: &Job, what: &str, error: Option<(i32, &str)>) {
        if self.json {
            let mut v = serde_json::json!({"event": what, "product": job.product_id, "catalogue": job.catalogue, "attempt": job.attempt, "worker": self.name});
            if let Some((code, message)) = error {
                v["error"] = message.into();
                v["code"] = code.into();
            }
            println!("{v}");
        } else {
            match error {
                Some((_, message)) => eprintln!("{}", tr!("cli.product_error", name = job.product_id, error = message)),
                None => eprintln!("{}", tr!("cli.worker_event", worker = self.name, event = what, product = job.product_id)),
            }
        }
    }
}

/// Staging folders of this job left by workers that died while generating it.
fn remove_stale_staging(job: &Job) {
    let (Some(parent), Some(name)) = (job.out_dir.parent(), job.out_dir.file_name()) else {
        return;
    };
    let prefix = format!(".{}.partial-", name.to_string_lossy());
    if let Ok(entries) = std::fs::read_dir(parent) {
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with(&prefix) {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

pub fn worker(global: &GlobalArgs, args: WorkerArgs) -> Result<(), CliError> {
    let manifest = global.manifest()?;
    let models = require_roles(&manifest, &[Role::Base, Role::Controlnet])?;
    let paths = model_paths(&manifest, Vec::new())?;
    let name = args.name.clone().unwrap_or_else(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        format!("{}-{}", host.trim(), std::process::id())
    });
    let queue = JobQueue::connect(&args.db).map_err(queue_err)?;
    let selection = global.select_device()?;
    if !global.json {
        eprintln!("{}", selection.notice);
        eprintln!("{}", tr!("cli.worker_started", worker = name, db = queue.location(), models = models));
    }
    let job = Worker {
        paths,
        queue,
        name,
        args,
        json: global.json,
        precision: global.dtype,
    };
    let report = device::dispatch(&selection, global.dtype, job)
        .map_err(super::device_error)?
        .map_err(|e| CliError::new(exit::FAILURE, e))?;
    if global.json {
        println!("{}", serde_json::json!({"event": "stopped", "report": report}));
    } else {
        println!("{}", tr!("cli.worker_stopped", done = report.done, failed = report.failed, lost = report.lost));
    }
    Ok(())
}
