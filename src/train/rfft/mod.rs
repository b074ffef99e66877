//! RFFT: fine-tuning the ControlNet with RFNet feedback (PAPER.md "RFFT").
//!
//! One iteration (for a batch of products with their prompts, a seeded noise each):
//! 1. the DDIM chain (`sample_steps`, 40) with CFG, ControlNet and the latent blend of eq. (2),
//!    without gradients (inner backend), up to a step k drawn among the last `last_steps` (10) —
//!    the pipeline's own sampler (`pipeline::sampler::sample` over the steps `0..k`);
//! 2. at step k, with gradients: ControlNet + UNet on the CFG pair, the guided eps, x0_hat =
//!    (x - sqrt(1 - a_t) eps) / sqrt(a_t), blended with the product's clean latent where eq. (2)
//!    keeps it, VAE decode, the product pasted back with its undilated alpha — the same sampler
//!    functions generation uses;
//! 3. the pipeline's judge (`pipeline::judge::Judge::logits`: depth, saliency and the frozen
//!    RFNet on product, image, maps and title) on that image, differentiably; F_AC =
//!    cross-entropy towards Available;
//! 4. the regulariser: `cc` L_CC = || g_theta - g_ref ||_2 per sample (mean over the batch) with
//!    g = -(eps(x, z, c) - eps(x, c)) / sqrt(1 - a_t) and g_ref from a frozen copy of the original
//!    ControlNet; `kl` = || x0_theta - x0_ref ||^2 * a_t / (2 (1 - a_t)) per sample (the KL
//!    between two Gaussians centred on the two x0_hat with the variance (1 - a_t) / a_t that a
//!    unit-variance eps error gives x0_hat); `none`;
//! 5. total = F_AC + beta * reg, backward, AdamW (gradients accumulated over `grad_accum`).
//!
//! Trainable: the whole ControlNet (`lora_rank = 0`, as the paper) or LoRA adapters on its
//! Linear and 1x1-conv layers (`models::lora`). Everything else is loaded with `no_grad`.
//!
//! The files, one job each: `config` (`run.toml`), `objective` (steps 2-5), `products` (placed
//! products and batches), `session` (everything loaded, the draws, one forward/backward, the
//! evaluation), `trainer` (the loop, pause/stop, checkpoints, resume), `job` (the CLI's backend job and the GUI's worker), `export` (diffusers
//! export, side-by-side comparison), `bench` (`rfstudio bench rfft`), `error`.
//!
//! Every draw of an iteration comes from `(seed, step, micro-batch)`, so `--resume` continues
//! exactly where the checkpoint left off.

pub mod bench;
pub mod config;
pub mod error;
pub mod export;
pub mod job;
pub mod objective;
pub mod products;
pub mod session;
pub mod trainer;

pub use bench::{IterationTimes, time_iterations};
pub use config::{ProductSpec, Regulariser, ResolvedModels, RfftConfig, RfftModelPaths};
pub use error::RfftError;
pub use job::{RfftJob, TrainJob, resolve_models, spawn_rfft, spawn_rfft_with};
pub use objective::{Batch, Frozen, Objective, StepSettings, guidance_direction, objective};
pub use products::{PreparedProduct, make_batch, prepare_products};
pub use crate::train::run_folder::{EvalMetrics, EvalSample, RfftEvent, RunState, RunStatus, StepMetrics};
pub use session::Session;
pub use trainer::{LoraInfo, PeerCtx, RunControl, StepGradients, load_finetuned, resume_config, step_gradients, train, train_on_peers};
