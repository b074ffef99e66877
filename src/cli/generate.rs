//! `rfstudio generate`: ad images for one product or a catalogue (`--batch-file`), with
//! recurrent generation when an RFNet scorer is installed.

use crate::tr;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use burn::tensor::backend::Backend;
use clap::Args;
use serde::Deserialize;

use super::progress::Progress;
use super::{CliError, GlobalArgs, exit, require_roles};
use crate::device::{self, BackendJob};
use crate::models::manifest::Role;
use crate::pipeline::score::Scorer;
use crate::pipeline::judge::{Judge, JudgePaths, JudgeSides};
use crate::pipeline::generate::{AdGenerator, CancelToken, GenError, GenEvent, ModelPaths, run_generation};
use crate::pipeline::params::GenerateParams;
use crate::pipeline::run_folder::{RunFolder, RunSummary};

#[derive(Args, Debug, Clone)]
pub struct GenerateArgs {
    /// Transparent product image (PNG or WebP with alpha).
    #[arg(long, required_unless_present = "batch_file")]
    pub product: Option<PathBuf>,
    /// A catalogue: JSON lines with `image`, `prompt`, optional `id`, `negative_prompt`, `title`
    /// (or `title_zh`/`title_en`). Finished products are skipped on rerun.
    #[arg(long, conflicts_with = "product")]
    pub batch_file: Option<PathBuf>,
    /// Background prompt.
    #[arg(long, default_value = "", required_unless_present = "batch_file")]
    pub prompt: String,
    /// A LoRA merged into the base model at load: FILE or FILE:STRENGTH (default 1, as A1111's
    /// <lora:NAME:STRENGTH>). Repeatable; kohya/A1111 and diffusers/PEFT files.
    #[arg(long = "lora", value_name = "FILE[:STRENGTH]", value_parser = crate::models::lora_file::LoraSpec::parse)]
    pub loras: Vec<crate::models::lora_file::LoraSpec>,
    /// Negative prompt: what the background must not show (CFG's unconditional side).
    #[arg(long, default_value = "")]
    pub negative: String,
    /// Product title (the caption RFNet reads).
    #[arg(long, default_value = "")]
    pub title: String,
    /// Seed of the first attempt (attempt i uses seed + i); random if omitted, always recorded.
    #[arg(long)]
    pub seed: Option<u64>,
    /// DDIM denoising steps per attempt (1-1000; the paper uses 40).
    #[arg(long, default_value_t = 40)]
    pub steps: usize,
    /// Classifier-free guidance scale (0-30; 7.5 as the paper).
    #[arg(long, default_value_t = 7.5)]
    pub guidance: f32,
    /// ControlNet conditioning scale (0-2; 1.0 as the paper).
    #[arg(long, default_value_t = 1.0)]
    pub controlnet_scale: f32,
    /// The product fits inside this fraction of the canvas.
    #[arg(long, default_value_t = 0.7)]
    pub scale: f32,
    /// The product's centre as canvas fractions, e.g. `0.5,0.6`.
    #[arg(long, value_parser = parse_position, default_value = "0.5,0.5")]
    pub position: (f32, f32),
    /// Canvas size in pixels (multiple of 64).
    #[arg(long, default_value_t = 512)]
    pub size: u32,
    /// Derive the product mask from a near-white background when the image has no alpha.
    #[arg(long)]
    pub white_bg: bool,
    /// The most candidates to generate (recurrent generation stops earlier once one is Available).
    #[arg(long, default_value_t = 4)]
    pub attempts: usize,
    /// P(Available) an image needs to be accepted.
    #[arg(long, default_value_t = 0.5)]
    pub threshold: f32,
    /// Candidates per forward pass.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Output folder (one sub-folder per product with --batch-file).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
}

fn parse_position(s: &str) -> Result<(f32, f32), String> {
    let (a, b) = s
        .split_once(',')
        .ok_or_else(|| format!("expected x,y (fractions of the canvas), got {s:?}"))?;
    let p = |v: &str| v.trim().parse::<f32>().map_err(|e| format!("{v:?}: {e}"));
    Ok((p(a)?, p(b)?))
}

#[derive(Deserialize)]
struct CatalogueLine {
    id: Option<String>,
    image: PathBuf,
    prompt: String,
    #[serde(default)]
    negative_prompt: Option<String>,
    #[serde(default)]
    title: Option<String>,
    #[serde(default)]
    title_zh: Option<String>,
    #[serde(default)]
    title_en: Option<String>,
}

/// One product to generate for.
pub(super) struct Item {
    pub(super) name: String,
    pub(super) product: PathBuf,
    pub(super) params: GenerateParams,
    pub(super) out_dir: PathBuf,
}

impl GenerateArgs {
    fn params(&self) -> GenerateParams {
        GenerateParams {
            prompt: self.prompt.clone(),
            negative: self.negative.clone(),
            title: self.title.clone(),
            seed: self.seed,
            steps: self.steps,
            guidance: self.guidance,
            controlnet_scale: self.controlnet_scale,
            scale: self.scale,
            position: self.position,
            canvas: self.size,
            white_bg: self.white_bg,
            attempts: self.attempts,
            threshold: self.threshold,
            batch: self.batch,
        }
    }

    pub(super) fn items(&self) -> Result<(Vec<Item>, usize), CliError> {
        let Some(file) = &self.batch_file else {
            let product = self.product.clone().unwrap_or_default();
            return Ok((
                vec![Item {
                    name: product.display().to_string(),
                    product,
                    params: self.params(),
                    out_dir: self.out.clone(),
                }],
                0,
            ));
        };
        let text = std::fs::read_to_string(file)
            .map_err(|e| CliError::bad_input(anyhow::anyhow!("{}: {e}", file.display())))?;
        let base = file.parent().unwrap_or(Path::new("."));
        let mut items = Vec::new();
        let mut skipped = 0;
        // output folder name -> (line, whether the name came from an explicit `id`)
        let mut used: HashMap<String, (usize, bool)> = HashMap::new();
        for (n, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let at = || format!("{} line {}", file.display(), n + 1);
            let entry: CatalogueLine = serde_json::from_str(line)
                .map_err(|e| CliError::bad_input(anyhow::anyhow!("{}: {e}", at())))?;
            let explicit = entry.id.is_some();
            let id = entry.id.clone().unwrap_or_else(|| {
                entry
                    .image
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_else(|| format!("product_{}", n + 1))
            });
            check_output_id(&id).map_err(|why| CliError::bad_input(anyhow::anyhow!("{}: id {id:?} {why}", at())))?;
            // Folder names compare case-insensitively: two ids differing only in case would
            // share a folder on macOS and Windows file systems.
            if let Some((first, first_explicit)) = used.insert(id.to_lowercase(), (n + 1, explicit)) {
                let source = if explicit && first_explicit {
                    "the same `id`"
                } else {
                    "the same output folder (an `id`, or the image's file name where `id` is absent)"
                };
                return Err(CliError::bad_input(anyhow::anyhow!(
                    "{}: {source} {id:?} as line {first}; each product needs its own output folder under --out, so give every line a distinct `id`",
                    at()
                )));
            }
            let out_dir = self.out.join(&id);
            if RunFolder::new(&out_dir).is_finished() {
                skipped += 1;
                continue;
            }
            let mut params = self.params();
            params.prompt = entry.prompt;
            params.negative = entry.negative_prompt.unwrap_or_else(|| self.negative.clone());
            params.title = entry
                .title
                .or(entry.title_zh)
                .or(entry.title_en)
                .unwrap_or_default();
            let product = if entry.image.is_absolute() {
                entry.image
            } else {
                base.join(entry.image)
            };
            items.push(Item {
                name: id,
                product,
                params,
                out_dir,
            });
        }
        if items.is_empty() && skipped == 0 {
            return Err(CliError::bad_input(anyhow::anyhow!(
                "{}: the catalogue lists no products (one JSON object per line with `image` and `prompt`)",
                file.display()
            )));
        }
        Ok((items, skipped))
    }
}

/// The longest catalogue id (a folder name; most file systems allow 255 bytes).
const MAX_ID_BYTES: usize = 200;

/// A catalogue id names the product's output folder directly under `--out`: one plain path
/// component, so that no id can write outside `--out` or into another product's folder.
fn check_output_id(id: &str) -> Result<(), &'static str> {
    if id.trim().is_empty() {
        return Err("is empty");
    }
    if id == "." || id == ".." {
        return Err("is not a folder name");
    }
    if id.contains(['/', '\\']) || Path::new(id).is_absolute() {
        return Err("contains a path separator; ids name one folder under --out");
    }
    if id.chars().any(char::is_control) {
        return Err("contains control characters");
    }
    if id.len() > MAX_ID_BYTES {
        return Err("is longer than 200 bytes");
    }
    Ok(())
}

/// The generation models the manifest names (base, ControlNet, the judge if installed).
pub(super) fn model_paths(manifest: &crate::models::manifest::Manifest, loras: Vec<crate::models::lora_file::LoraSpec>) -> Result<ModelPaths, CliError> {
    Ok(ModelPaths {
        base: manifest.path(Role::Base).map(Path::to_path_buf).unwrap_or_default(),
        controlnet: manifest.path(Role::Controlnet).map(Path::to_path_buf).unwrap_or_default(),
        scorer: JudgePaths::from_manifest(manifest).map_err(|e| CliError::new(super::score_code(&e), e))?,
        test_weights: manifest.test_weights,
        loras,
    })
}

/// Load the generator and, when installed, the judge that scores its attempts (once per job).
pub(super) fn load_models<B: Backend>(
    paths: &ModelPaths,
    precision: device::Precision,
    device: &B::Device,
) -> Result<(AdGenerator<B>, Option<Judge<B>>), GenError> {
    let generator = AdGenerator::<B>::load(paths, precision.dtype(), device)?;
    let scorer = match &paths.scorer {
        Some(p) => Some(Judge::<B>::load(p, JudgeSides::default(), precision.dtype(), device)?),
        None => None,
    };
    Ok((generator, scorer))
}

pub(super) fn code_of(e: &GenError) -> i32 {
    match e {
        GenError::Product(_) | GenError::Params(_) | GenError::Output(_) | GenError::File(_) | GenError::RunFolder(_) | GenError::Device(_) => {
            exit::BAD_INPUT
        }
        GenError::Models(_) | GenError::Sampling(crate::pipeline::sd::SdError::Residuals { .. } | crate::pipeline::sd::SdError::Geometry { .. }) => exit::MODELS_MISSING,
        GenError::Score(e) => super::score_code(e),
        GenError::NonFinite(n) if n.weights_corrupt() => exit::MODELS_MISSING,
        GenError::NonFinite(_) => exit::NUMERICAL,
        GenError::Sampling(_) | GenError::Cancelled | GenError::Panicked(_) => exit::FAILURE,
    }
}

struct GenerateCli {
    paths: ModelPaths,
    items: Vec<Item>,
    json: bool,
    precision: device::Precision,
}

impl BackendJob for GenerateCli {
    type Output = Result<Vec<(String, Result<RunSummary, GenError>)>, GenError>;

    fn run<B: Backend>(self, device: B::Device) -> Self::Output {
        let (generator, mut scorer) = load_models::<B>(&self.paths, self.precision, &device)?;
        let cancel = CancelToken::new();
        let mut results = Vec::new();
        let products = self.items.len();
        for (index, item) in self.items.into_iter().enumerate() {
            let label = if products > 1 {
                format!("[{}/{products}] {}", index + 1, item.name)
            } else {
                item.name.clone()
            };
            let progress = Progress::new(self.json, &label, item.params.steps as u64, "{prefix} [{bar:30}] {pos}/{len} {msg}");
            let json = self.json;
            let name = item.name.clone();
            let batch = item.params.batch.max(1);
            // The whole run's steps: every batch of attempts runs all denoising steps.
            let mut run_steps = 0usize;
            let mut emit = |e: GenEvent| match e {
                GenEvent::Started { seed, attempts, steps, test_weights, .. } => {
                    run_steps = attempts.div_ceil(batch) * steps;
                    if json {
                        println!(
                            "{}",
                            serde_json::json!({"event": "started", "product": name, "seed": seed, "attempts": attempts, "test_weights": test_weights})
                        );
                    }
                }
                GenEvent::Step { attempt, step, total, .. } => {
                    let done = (attempt - 1) / batch * total + step;
                    if json {
                        println!(
                            "{}",
                            serde_json::json!({"event": "step", "product": name, "attempt": attempt, "step": step, "total": total, "run_step": done, "run_total": run_steps})
                        );
                    } else {
                        progress.set(
                            done as u64,
                            run_steps.max(done) as u64,
                            &format!("(attempt {attempt}, step {step}/{total})"),
                        );
                    }
                }
                GenEvent::Attempt(r) => {
                    if json {
                        println!("{}", serde_json::json!({"event": "attempt", "product": name, "record": r}));
                    } else {
                        let verdict = match (r.probs, r.available) {
                            (Some(p), Some(ok)) => format!(
                                "P(Available) {:.3} {}",
                                p.available(),
                                if ok { "ACCEPTED" } else { "rejected" }
                            ),
                            _ => "unscored".into(),
                        };
                        progress.println(&format!("  attempt {} (seed {}): {} -> {}", r.attempt, r.seed, r.file, verdict));
                    }
                }
                GenEvent::Finished(s) => {
                    if json {
                        println!("{}", serde_json::json!({"event": "finished", "product": name, "summary": s}));
                    }
                }
            };
            let result = run_generation(
                &generator,
                scorer.as_mut().map(|s| s as &mut dyn Scorer),
                &item.product,
                &item.params,
                &item.out_dir,
                &cancel,
                &mut emit,
            );
            progress.finish();
            results.push((item.name, result));
        }
        Ok(results)
    }
}

pub fn run(global: &GlobalArgs, args: &GenerateArgs) -> Result<(), CliError> {
    let manifest = global.manifest()?;
    let report = require_roles(&manifest, &[Role::Base, Role::Controlnet])?;
    let (items, skipped) = args.items()?;
    if skipped > 0 {
        if global.json {
            println!("{}", serde_json::json!({"event": "skipped", "products": skipped, "reason": "already finished", "out": args.out}));
        } else {
            eprintln!("{}", tr!("cli.generate_skipped", n = skipped, out = args.out.display()));
        }
    }
    let selection = global.select_device()?;
    let budget = device::memory_budget_bytes(&selection);
    for item in &items {
        item.params
            .validate_for(budget, global.dtype.element_bytes())
            .map_err(|e| CliError::bad_input(anyhow::Error::from(e)))?;
    }
    let paths = model_paths(&manifest, args.loras.clone())?;
    if !global.json {
        eprintln!("{}", selection.notice);
        if manifest.test_weights {
            eprintln!("{}", tr!("cli.generate_test_weights", models = report));
        }
    }
    let job = GenerateCli {
        paths,
        items,
        json: global.json,
        precision: global.dtype,
    };
    let results = device::dispatch(&selection, global.dtype, job)
        .map_err(super::device_error)?
        .map_err(|e| CliError::new(code_of(&e), anyhow::Error::from(e)))?;
    // One product: its error is the command's error (printed once, by main). A catalogue: each
    // product's error on its own line, then a summary; the exit code is the most severe.
    let catalogue = args.batch_file.is_some();
    let total = results.len();
    let mut worst = exit::OK;
    let (mut failed, mut unavailable) = (0usize, 0usize);
    let mut single_error = None;
    for (name, r) in results {
        match r {
            Ok(s) => {
                if !global.json
                    && let Some(best) = s.attempts.get(s.best)
                {
                    let verdict = match s.available {
                        Some(true) => tr!("cli.verdict_available"),
                        Some(false) => tr!("cli.verdict_unavailable"),
                        None => tr!("cli.verdict_unscored"),
                    };
                    println!(
                        "{}",
                        tr!(
                            "cli.generate_result",
                            name = name,
                            attempts = s.attempts.len(),
                            best = best.file,
                            seed = best.seed,
                            out = s.out_dir.display(),
                            verdict = verdict
                        )
                    );
                }
                if s.available == Some(false) {
                    unavailable += 1;
                    worst = exit::more_severe(worst, exit::NOT_AVAILABLE);
                }
            }
            Err(e) => {
                let code = code_of(&e);
                failed += 1;
                worst = exit::more_severe(worst, code);
                if global.json {
                    println!("{}", serde_json::json!({"event": "error", "product": name, "error": e.to_string(), "code": code}));
                } else if catalogue {
                    eprintln!("{}", tr!("cli.product_error", name = name, error = e));
                }
                if !catalogue {
                    single_error = Some(e);
                }
            }
        }
    }
    if worst == exit::OK {
        return Ok(());
    }
    let error = match single_error {
        Some(e) => anyhow::Error::from(e),
        None if catalogue => anyhow::anyhow!(
            "{failed} of {total} product(s) failed, {unavailable} without an available image within the attempts"
        ),
        None => anyhow::anyhow!("no available image within the attempts"),
    };
    Err(CliError::new(worst, error))
}
