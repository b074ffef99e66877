//! The persisted part of the studio: one serde struct, saved by eframe's storage between runs.
//! Runtime handles (workers, channels, textures) live beside it in `Studio` and are never saved.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::data::session::QueueOrder;
use crate::device::{DeviceRequest, Precision};
use crate::models::manifest::Role;
use crate::pipeline::params::GenerateParams;

/// The four tabs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum Tab {
    #[default]
    Generate,
    Annotate,
    Finetune,
    Models,
}

impl Tab {
    pub const ALL: [Tab; 4] = [Tab::Generate, Tab::Annotate, Tab::Finetune, Tab::Models];

    /// The tab's name in the interface language.
    pub fn label(self) -> &'static str {
        match self {
            Tab::Generate => crate::tr!("common.tab_generate"),
            Tab::Annotate => crate::tr!("common.tab_annotate"),
            Tab::Finetune => crate::tr!("common.tab_finetune"),
            Tab::Models => crate::tr!("common.tab_models"),
        }
    }

    /// The tab's English name (command-line values, log lines).
    pub fn title(self) -> &'static str {
        match self {
            Tab::Generate => "Generate",
            Tab::Annotate => "Annotate",
            Tab::Finetune => "Fine-tune",
            Tab::Models => "Models",
        }
    }

    /// Parse a tab name as typed on the command line (`generate`, `annotate`, `finetune`, `models`).
    pub fn parse(s: &str) -> Option<Tab> {
        let n: String = s.chars().filter(|c| c.is_ascii_alphanumeric()).flat_map(char::to_lowercase).collect();
        Tab::ALL
            .into_iter()
            .find(|t| t.title().chars().filter(|c| c.is_ascii_alphanumeric()).flat_map(char::to_lowercase).collect::<String>() == n)
    }
}

/// The Generate tab's form.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default)]
pub struct GenerateForm {
    /// The transparent product PNG.
    pub product: Option<PathBuf>,
    pub params: GenerateParams,
    /// Draw a new random seed for each run (else `seed`).
    pub random_seed: bool,
    pub seed: u64,
    /// Each run writes into a new sub-folder of this folder.
    pub out_root: PathBuf,
    /// LoRA files merged into the base model, each at its strength.
    pub loras: Vec<crate::models::lora_file::LoraSpec>,
    /// The `postgres://` URL of a catalogue queue to watch (saved without a password).
    #[serde(serialize_with = "url_without_password")]
    pub catalogue_db: String,
}

fn url_without_password<S: serde::Serializer>(url: &str, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&crate::data::store::pgconf::without_password(url))
}

impl GenerateForm {
    /// Choose another product. The title is the product's (RFNet's caption), so it is cleared
    /// when the product changes; a bundled sample or a history entry sets its own afterwards.
    pub fn set_product(&mut self, product: Option<PathBuf>) {
        if product != self.product {
            self.params.title.clear();
        }
        self.product = product;
    }
}

impl Default for GenerateForm {
    fn default() -> Self {
        Self {
            product: None,
            params: GenerateParams::default(),
            random_seed: true,
            seed: 42,
            out_root: in_user_data("out"),
            loras: Vec::new(),
            catalogue_db: String::new(),
        }
    }
}

/// The Annotate tab's form.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default)]
pub struct AnnotateForm {
    /// A dataset folder (`dataset.sqlite` + blobs, see `rfstudio dataset init`) or a
    /// `postgres://` URL; saved without any password typed into the URL.
    #[serde(serialize_with = "dataset_without_password")]
    pub dataset: PathBuf,
    pub annotator: String,
    pub order: QueueOrder,
}

fn dataset_without_password<S: serde::Serializer>(dataset: &Path, s: S) -> Result<S::Ok, S::Error> {
    match dataset.to_str() {
        Some(url) if crate::data::store::pgconf::is_url(dataset) => {
            s.serialize_str(&crate::data::store::pgconf::without_password(url))
        }
        _ => dataset.serialize(s),
    }
}

impl Default for AnnotateForm {
    fn default() -> Self {
        Self {
            dataset: in_user_data("datasets/rf1m"),
            annotator: std::env::var("USER").unwrap_or_else(|_| "annotator".into()),
            order: QueueOrder::Unlabelled,
        }
    }
}

/// RFFT regularisation (the `reg` field of an RFFT run's `run.toml`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Regularisation {
    #[default]
    Cc,
    Kl,
    None,
}

impl Regularisation {
    pub const ALL: [Regularisation; 3] = [Regularisation::Cc, Regularisation::Kl, Regularisation::None];
    pub fn label(self) -> &'static str {
        match self {
            Regularisation::Cc => crate::tr!("finetune.reg_cc"),
            Regularisation::Kl => "KL",
            Regularisation::None => crate::tr!("finetune.reg_none"),
        }
    }
    pub fn key(self) -> &'static str {
        match self {
            Regularisation::Cc => "cc",
            Regularisation::Kl => "kl",
            Regularisation::None => "none",
        }
    }
}

/// The Fine-tune tab's form (a new RFFT run) and which run folder is shown.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default)]
pub struct FinetuneForm {
    /// Folder holding run folders (RFFT and RFNet training runs).
    pub runs_root: PathBuf,
    /// The run shown.
    pub selected: Option<PathBuf>,
    /// Product PNGs to fine-tune on.
    pub products: Vec<PathBuf>,
    /// One prompt per line.
    pub prompts: String,
    pub reg: Regularisation,
    pub beta: f32,
    pub lr: f64,
    pub steps: usize,
    pub eval_every: usize,
    pub seed: u64,
    pub lora_rank: usize,
    pub name: String,
    /// Products scored at each eval step (empty: the training products).
    pub eval_products: Vec<PathBuf>,
    pub image_size: u32,
    pub sample_steps: usize,
    pub last_steps: usize,
    pub batch: usize,
    /// Micro-batches per step (`grad_accum`).
    pub grad_accum: usize,
    /// Data-parallel devices (`cuda:0,cuda:1`); empty: the studio's device.
    pub devices: String,
}

impl Default for FinetuneForm {
    fn default() -> Self {
        Self {
            runs_root: in_user_data("runs"),
            selected: None,
            products: Vec::new(),
            prompts: String::new(),
            reg: Regularisation::Cc,
            beta: 1.0,
            lr: 1e-5,
            steps: 1000,
            eval_every: 50,
            seed: 0,
            lora_rank: 8,
            name: "rfft".into(),
            eval_products: Vec::new(),
            image_size: 512,
            sample_steps: 40,
            last_steps: 10,
            batch: 1,
            grad_accum: 1,
            devices: String::new(),
        }
    }
}

/// Everything the studio remembers between runs.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default)]
pub struct Settings {
    pub tab: Tab,
    /// The interface language; `None` follows the system locale.
    pub lang: Option<crate::i18n::Lang>,
    /// Folder holding `models.toml`.
    pub models_dir: PathBuf,
    /// Per-role folders edited in the Models tab (override the manifest).
    pub role_overrides: BTreeMap<Role, PathBuf>,
    pub device: DeviceRequest,
    pub dtype: Precision,
    pub generate: GenerateForm,
    pub annotate: AnnotateForm,
    pub finetune: FinetuneForm,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            tab: Tab::Generate,
            lang: None,
            models_dir: crate::files::default_models_dir(),
            role_overrides: BTreeMap::new(),
            device: DeviceRequest::Auto,
            dtype: Precision::F32,
            generate: GenerateForm::default(),
            annotate: AnnotateForm::default(),
            finetune: FinetuneForm::default(),
        }
    }
}

/// A folder in the user's data folder (~/.local/share/rfstudio/...): where the studio keeps its
/// outputs, datasets and runs unless told otherwise (never beside the binary).
fn in_user_data(rel: &str) -> PathBuf {
    crate::files::user_data_dir().map(|d| d.join(rel)).unwrap_or_else(|| PathBuf::from(rel))
}

/// eframe storage key of `Settings`.
pub const SETTINGS_KEY: &str = "rfstudio-settings";
