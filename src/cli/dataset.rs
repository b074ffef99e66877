//! `rfstudio dataset init|import|export|stats|split|label|team|gold|grant|migrate`: the
//! annotation store from scripts. Every DIR may also be a `postgres://` URL (a team dataset on a
//! server).

use crate::tr;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};

use super::progress::Progress;
use super::{CliError, GlobalArgs, exit};
use crate::data::agreement;
use crate::data::export::{self, Format};
use crate::data::import::{ImportKind, import};
use crate::data::store::{Claim, Decision, Role, Store, StoreError, describe_location};

#[derive(Subcommand, Debug)]
pub enum DatasetCommand {
    /// Create a dataset: a folder (SQLite store + image folder), or a PostgreSQL database
    /// (`postgres://` URL) whose images live in a shared folder (--images).
    Init {
        /// The dataset folder (created if missing; an existing dataset is left as it is), or a
        /// `postgres://user@host/db` URL (password from PGPASSWORD or ~/.pgpass, not the URL).
        dir: PathBuf,
        /// PostgreSQL only: the image folder every client of the dataset reaches at this same
        /// path (a shared mount); recorded in the database.
        #[arg(long)]
        images: Option<PathBuf>,
    },
    /// Team settings: each sample labelled by --overlap different annotators (handed out by
    /// `dataset label`'s `next`), leases, gold samples, blind labelling. Prints the settings;
    /// the options change them.
    Team(TeamArgs),
    /// Mark gold samples from standard input, one `<sample id> <label>` per line (`none` makes a
    /// sample ordinary again); annotators' accuracy on them shows in `dataset stats`.
    Gold {
        /// The dataset folder or `postgres://` URL.
        dir: PathBuf,
    },
    /// PostgreSQL only: give a database login a team role, enforced by the server (annotators
    /// read and write only their own labels; reviewers read all; admins do everything).
    Grant {
        /// The dataset's `postgres://` URL (connect as its owner or another role admin).
        dir: PathBuf,
        /// The database login (created without a password if missing).
        login: String,
        /// annotator (own labels only), reviewer (reads all labels, final decisions) or admin.
        #[arg(long, value_enum)]
        role: Role,
    },
    /// Copy a dataset into an empty one, SQLite to PostgreSQL or back: images, samples and
    /// labels with their ids and times; counts and checksums of both sides are compared.
    Migrate {
        /// The dataset to copy (folder or `postgres://` URL).
        from: PathBuf,
        /// The target: a new folder, or a `postgres://` URL (with --images when the database
        /// is not a dataset yet).
        to: PathBuf,
        /// Image folder of a new PostgreSQL target (see `dataset init --images`).
        #[arg(long)]
        images: Option<PathBuf>,
    },
    /// Import samples (and labels) from generation outputs, an image folder, or RF1M.
    Import(ImportArgs),
    /// Export samples with their final labels.
    Export(ExportArgs),
    /// Class counts, annotator throughput, Cohen's and Fleiss' kappa, disagreements.
    Stats {
        /// The dataset folder.
        dir: PathBuf,
    },
    /// Write train/val/test JSONL files, split by product.
    Split(SplitArgs),
    /// Label from standard input, one `<sample id> <label>` per line (label: 0-4, a class name,
    /// or `unsuitable`); each line is committed before `ok <label id> <sample id>` is printed.
    /// A `next` line asks for the team's next sample for this annotator: `sample <id>` (leased
    /// to you), `wait` (the rest is leased to others for now) or `done`.
    Label(LabelArgs),
}

#[derive(Args, Debug)]
pub struct ImportArgs {
    /// The dataset folder to import into (`rfstudio dataset init` first).
    pub dir: PathBuf,
    /// A generation output folder (ours), an image folder (folder), or the RF1M label file (rf1m).
    #[arg(long)]
    pub from: PathBuf,
    /// What --from is: ours (rfstudio generate output folders, found recursively), folder
    /// (images with an optional metadata.jsonl/.csv), rf1m (the RF1M label file).
    #[arg(long, value_enum, default_value = "ours")]
    pub kind: ImportKind,
    /// RF1M only: folder the label file's image paths are relative to (default: its folder).
    #[arg(long)]
    pub images: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct ExportArgs {
    /// The dataset folder.
    pub dir: PathBuf,
    /// jsonl or csv.
    #[arg(long, value_enum, default_value = "jsonl")]
    pub format: Format,
    /// The file to write.
    #[arg(long)]
    pub out: PathBuf,
    /// Split ratios train,val,test (the `split` column).
    #[arg(long, value_delimiter = ',', default_value = "0.8,0.1,0.1")]
    pub ratios: Vec<f64>,
    /// Seed of the product shuffle that assigns the splits.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// One row per individual label (annotator, decision, review flag, time) instead of one per
    /// sample with its final label.
    #[arg(long)]
    pub labels: bool,
}

#[derive(Args, Debug)]
pub struct TeamArgs {
    /// The dataset folder or `postgres://` URL.
    pub dir: PathBuf,
    /// Different annotators per sample (0: no hand-out, anyone labels anything).
    #[arg(long)]
    pub overlap: Option<i64>,
    /// Seconds a handed-out sample stays with its annotator before others may take it.
    #[arg(long)]
    pub lease_seconds: Option<i64>,
    /// Every n-th hand-out is a gold sample the annotator has not labelled (0: none).
    #[arg(long)]
    pub gold_every: Option<i64>,
    /// Hide other annotators' labels and RFNet's prediction from annotators.
    #[arg(long)]
    pub blind: Option<bool>,
}

#[derive(Args, Debug)]
pub struct SplitArgs {
    /// The dataset folder.
    pub dir: PathBuf,
    /// Split ratios train,val,test (three finite numbers >= 0, not all zero; normalised).
    #[arg(long, value_delimiter = ',', default_value = "0.8,0.1,0.1")]
    pub ratios: Vec<f64>,
    /// Seed of the product shuffle that assigns the splits.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Folder for train.jsonl, val.jsonl and test.jsonl (default: DIR/splits).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct LabelArgs {
    /// The dataset folder.
    pub dir: PathBuf,
    /// Who is labelling (1-64 characters, no control characters); labels are stored under it.
    #[arg(long)]
    pub annotator: String,
    /// Record review decisions (they override the majority vote).
    #[arg(long)]
    pub review: bool,
}

fn store_err(e: StoreError) -> CliError {
    match e {
        StoreError::NotADataset(_)
        | StoreError::NoImageRoot(_)
        | StoreError::OtherImageRoot { .. }
        | StoreError::BadDatabaseUrl { .. }
        | StoreError::NotEmpty { .. }
        | StoreError::BadSetting { .. }
        | StoreError::RolesNeedPostgres(_)
        | StoreError::NotAssigned { .. }
        | StoreError::UnknownLabel { .. }
        | StoreError::BadAnnotator(..)
        | StoreError::NoSample(_)
        | StoreError::Io { .. } => CliError::bad_input(e),
        other => CliError::new(exit::FAILURE, other),
    }
}

fn ratios(v: &[f64]) -> Result<(f64, f64, f64), CliError> {
    match v {
        [a, b, c] if [a, b, c].iter().all(|x| x.is_finite() && **x >= 0.0) && a + b + c > 0.0 => Ok((*a, *b, *c)),
        _ => Err(CliError::bad_input(anyhow::anyhow!(
            "--ratios needs three finite, non-negative numbers that are not all zero, e.g. 0.8,0.1,0.1"
        ))),
    }
}

pub fn run(global: &GlobalArgs, command: DatasetCommand) -> Result<(), CliError> {
    match command {
        DatasetCommand::Init { dir, images } => {
            let store = init_at(&dir, images.as_deref())?;
            let n = store.sample_count().map_err(store_err)?;
            let shown = describe_location(&dir);
            if global.json {
                println!(
                    "{}",
                    serde_json::json!({"dataset": shown, "images": store.dir(), "samples": n, "schema": store.schema_version().map_err(store_err)?})
                );
            } else {
                println!("{}", tr!("cli.dataset_ready", dir = shown, n = n));
            }
            Ok(())
        }
        DatasetCommand::Team(a) => {
            let store = Store::open(&a.dir).map_err(store_err)?;
            let mut t = store.team_settings().map_err(store_err)?;
            let changed = a.overlap.is_some() || a.lease_seconds.is_some() || a.gold_every.is_some() || a.blind.is_some();
            t.overlap = a.overlap.unwrap_or(t.overlap);
            t.lease_seconds = a.lease_seconds.unwrap_or(t.lease_seconds);
            t.gold_every = a.gold_every.unwrap_or(t.gold_every);
            t.blind = a.blind.unwrap_or(t.blind);
            if changed {
                store.set_team_settings(&t).map_err(store_err)?;
            }
            if global.json {
                println!("{}", serde_json::to_string(&t).map_err(anyhow::Error::from)?);
            } else {
                println!(
                    "{}",
                    tr!(
                        "cli.team_settings",
                        overlap = t.overlap,
                        lease = t.lease_seconds,
                        gold = t.gold_every,
                        blind = t.blind
                    )
                );
            }
            Ok(())
        }
        DatasetCommand::Gold { dir } => {
            let store = Store::open(&dir).map_err(store_err)?;
            let mut errors = 0;
            for (n, line) in std::io::stdin().lock().lines().enumerate() {
                let line = line.map_err(|e| CliError::bad_input(anyhow::anyhow!("stdin: {e}")))?;
                let mut parts = line.split_whitespace();
                let (Some(id), Some(answer)) = (parts.next(), parts.next()) else { continue };
                let result = (|| -> Result<(), LabelLineError> {
                    let id: i64 = id.parse().map_err(|_| LabelLineError::NoSampleId)?;
                    let d = if answer == "none" { None } else { Some(Decision::parse(answer, false)?) };
                    store.set_gold(id, d)?;
                    Ok(())
                })();
                if let Err(why) = result {
                    errors += 1;
                    eprintln!("{}", tr!("cli.label_line_error", line = n + 1, why = why));
                }
            }
            if errors > 0 {
                return Err(CliError::bad_input(anyhow::anyhow!("{}", tr!("cli.label_failed", n = errors))));
            }
            let gold = store.gold().map_err(store_err)?;
            if global.json {
                println!("{}", serde_json::json!({"gold": gold.len()}));
            } else {
                println!("{}", tr!("cli.gold_count", n = gold.len()));
            }
            Ok(())
        }
        DatasetCommand::Grant { dir, login, role } => {
            let store = Store::open(&dir).map_err(store_err)?;
            store.grant(&login, role).map_err(store_err)?;
            if !global.json {
                let role = match role {
                    Role::Annotator => tr!("cli.role_annotator"),
                    Role::Reviewer => tr!("cli.role_reviewer"),
                    Role::Admin => tr!("cli.role_admin"),
                };
                println!("{}", tr!("cli.granted", login = login, role = role));
            }
            Ok(())
        }
        DatasetCommand::Migrate { from, to, images } => {
            let source = Store::open(&from).map_err(store_err)?;
            let target = init_at(&to, images.as_deref())?;
            let progress = Progress::new(global.json, tr!("cli.progress_copying"), 0, "{prefix} {msg} [{bar:30}] {pos}/{len}");
            let report = crate::data::migrate::migrate(&source, &target, &mut |stage, done, total| {
                progress.set(done, total, stage);
            });
            progress.finish();
            let report = report.map_err(|e| match e {
                crate::data::migrate::MigrateError::Store(e) => store_err(e),
                other => CliError::new(exit::FAILURE, other),
            })?;
            if global.json {
                println!("{}", serde_json::to_string(&report).map_err(anyhow::Error::from)?);
            } else {
                println!(
                    "{}",
                    tr!(
                        "cli.dataset_migrated",
                        from = report.from,
                        to = report.to,
                        samples = report.target.samples,
                        labels = report.target.labels,
                        copied = report.images_copied,
                        present = report.images_present
                    )
                );
                println!("  samples sha256 {}", report.target.samples_sha256);
                println!("  labels  sha256 {}", report.target.labels_sha256);
            }
            Ok(())
        }
        DatasetCommand::Import(a) => {
            let store = Store::open(&a.dir).map_err(store_err)?;
            let progress = Progress::new(global.json, tr!("cli.progress_importing"), 0, "{prefix} [{bar:30}] {pos}/{len}");
            let report = import(&store, &a.from, a.kind, a.images.as_deref(), &mut |done, total| {
                progress.set(done as u64, total as u64, "");
            })
            .map_err(store_err)?;
            progress.finish();
            if global.json {
                println!("{}", serde_json::to_string(&report).map_err(anyhow::Error::from)?);
            } else {
                println!(
                    "{}",
                    tr!(
                        "cli.dataset_imported",
                        added = report.added,
                        duplicates = report.duplicates,
                        labels = report.labels,
                        changed = report.relabelled,
                        problems = report.problems.len()
                    )
                );
                for (at, why) in &report.problems {
                    println!("  {at}: {why}");
                }
            }
            Ok(())
        }
        DatasetCommand::Export(a) => {
            let store = Store::open(&a.dir).map_err(store_err)?;
            let n = if a.labels {
                let rows = export::label_rows(&store).map_err(store_err)?;
                export::write(&rows, a.format, &a.out).map_err(store_err)?;
                rows.len()
            } else {
                let rows = export::rows(&store, a.seed, ratios(&a.ratios)?).map_err(store_err)?;
                export::write(&rows, a.format, &a.out).map_err(store_err)?;
                rows.len()
            };
            if !global.json {
                println!("{}", tr!("cli.dataset_exported", rows = n, out = a.out.display()));
            }
            Ok(())
        }
        DatasetCommand::Stats { dir } => {
            let store = Store::open(&dir).map_err(store_err)?;
            let labels = store.all_labels().map_err(store_err)?;
            let n = store.sample_count().map_err(store_err)? as usize;
            let mut s = agreement::stats(n, &labels);
            s.gold = agreement::gold_accuracy(&labels, &store.gold().map_err(store_err)?);
            if global.json {
                println!("{}", serde_json::to_string(&s).map_err(anyhow::Error::from)?);
            } else {
                println!(
                    "{}",
                    tr!(
                        "cli.stats_summary",
                        samples = s.samples,
                        decided = s.labelled,
                        review = s.needs_review,
                        unlabelled = s.unlabelled
                    )
                );
                for (c, k) in &s.classes {
                    // Classes by their shown name; the JSON keeps the stored English names.
                    let shown = crate::pipeline::score::CLASS_NAMES
                        .iter()
                        .position(|n| n == c)
                        .map(crate::i18n::class_name)
                        .unwrap_or(c.as_str());
                    println!("  {shown:<20} {k}");
                }
                for a in &s.annotators {
                    println!(
                        "  {}",
                        tr!(
                            "cli.stats_annotator",
                            annotator = format!("{:<12}", a.annotator),
                            labels = a.labels,
                            per_hour = format!("{:.0}", a.labels_per_hour),
                            seconds = format!("{:.1}", a.mean_seconds)
                        )
                    );
                }
                for p in &s.cohen {
                    let k = p.kappa.map(|k| format!("{k:.3}")).unwrap_or_else(|| "-".into());
                    println!("  {}", tr!("cli.stats_cohen", a = p.a, b = p.b, kappa = k, shared = p.shared));
                }
                match s.fleiss {
                    Some(k) => println!("  {}", tr!("cli.stats_fleiss", kappa = format!("{k:.3}"))),
                    None => println!("  {}", tr!("cli.stats_fleiss_none")),
                }
                println!("  {}", tr!("cli.stats_disagreements", n = s.disagreements.len()));
                for g in &s.gold {
                    println!(
                        "  {}",
                        tr!(
                            "cli.stats_gold",
                            annotator = g.annotator,
                            correct = g.correct,
                            n = g.gold_labels,
                            percent = format!("{:.0}", g.accuracy * 100.0)
                        )
                    );
                }
            }
            Ok(())
        }
        DatasetCommand::Split(a) => {
            let store = Store::open(&a.dir).map_err(store_err)?;
            let rows = export::rows(&store, a.seed, ratios(&a.ratios)?).map_err(store_err)?;
            let out = a.out.unwrap_or_else(|| store.dir().join("splits"));
            std::fs::create_dir_all(&out).map_err(|e| CliError::bad_input(anyhow::anyhow!("{}: {e}", out.display())))?;
            let mut counts = Vec::new();
            for split in ["train", "val", "test"] {
                let part: Vec<_> = rows.iter().filter(|r| r.split == split).cloned().collect();
                export::write(&part, Format::Jsonl, &out.join(format!("{split}.jsonl"))).map_err(store_err)?;
                counts.push((split, part.len()));
            }
            if global.json {
                println!("{}", serde_json::json!({"out": out, "counts": counts.iter().map(|(s, n)| (s.to_string(), *n)).collect::<std::collections::BTreeMap<_, _>>()}));
            } else {
                for (s, n) in counts {
                    println!("{s}: {n}");
                }
            }
            Ok(())
        }
        DatasetCommand::Label(a) => {
            crate::data::store::validate_annotator(&a.annotator).map_err(store_err)?;
            let store = Store::open(&a.dir).map_err(store_err)?;
            let stdin = std::io::stdin();
            let mut stdout = std::io::stdout();
            let mut errors = 0;
            for (n, line) in stdin.lock().lines().enumerate() {
                let line = line.map_err(|e| CliError::bad_input(anyhow::anyhow!("stdin: {e}")))?;
                if line.trim().is_empty() {
                    continue;
                }
                if line.trim() == "next" {
                    // Team hand-out: `sample <id>` (leased to this annotator), `wait` (the
                    // rest is leased to others for now) or `done`.
                    match store.claim_next(&a.annotator) {
                        Ok(Claim::Sample(id)) => {
                            let _ = writeln!(stdout, "sample {id}");
                        }
                        Ok(Claim::Wait) => {
                            let _ = writeln!(stdout, "wait");
                        }
                        Ok(Claim::Done) => {
                            let _ = writeln!(stdout, "done");
                        }
                        Err(why) => {
                            errors += 1;
                            eprintln!("{}", tr!("cli.label_line_error", line = n + 1, why = why));
                        }
                    }
                    let _ = stdout.flush();
                    continue;
                }
                let mut parts = line.trim().splitn(2, char::is_whitespace);
                let result = (|| -> Result<(i64, i64), LabelLineError> {
                    let id: i64 = parts.next().unwrap_or_default().parse().map_err(|_| LabelLineError::NoSampleId)?;
                    let d = Decision::parse(parts.next().unwrap_or_default(), false)?;
                    let (label, _) = store.put_label(id, &a.annotator, d, 0, a.review)?;
                    Ok((label.id, id))
                })();
                match result {
                    Ok((label, sample)) => {
                        let _ = writeln!(stdout, "ok {label} {sample}");
                        let _ = stdout.flush();
                    }
                    Err(why) => {
                        errors += 1;
                        eprintln!("{}", tr!("cli.label_line_error", line = n + 1, why = why));
                    }
                }
            }
            if errors > 0 {
                Err(CliError::bad_input(anyhow::anyhow!("{}", tr!("cli.label_failed", n = errors))))
            } else {
                Ok(())
            }
        }
    }
}

/// Create or open the dataset at `location`: a folder, or a PostgreSQL URL (with `images`, the
/// shared image folder, when the database is not a dataset yet).
fn init_at(location: &Path, images: Option<&Path>) -> Result<Store, CliError> {
    match images {
        Some(images) if crate::data::store::pgconf::is_url(location) => {
            Store::init_postgres(location.to_str().unwrap_or_default(), images).map_err(store_err)
        }
        Some(_) => Err(CliError::bad_input(anyhow::anyhow!(
            "--images is for PostgreSQL datasets: a folder dataset keeps its images inside it"
        ))),
        None => Store::init(location).map_err(store_err),
    }
}

/// Why one line of `dataset label` input was not applied (the rest still are).
#[derive(Debug, thiserror::Error)]
enum LabelLineError {
    #[error("expected a sample id")]
    NoSampleId,
    #[error(transparent)]
    Store(#[from] crate::data::store::StoreError),
}
