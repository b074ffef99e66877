//! The model manifest (`models/models.toml`): which folder holds the checkpoint for each role,
//! and the checks `rfstudio info` runs on those folders (found / missing / invalid, with reasons).

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::weights::SafetensorsFile;

/// The roles a checkpoint can play in the product.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Stable Diffusion 1.5 diffusers folder (unet, vae, text_encoder, tokenizer, scheduler).
    Base,
    /// ControlNet (canny) diffusers folder.
    Controlnet,
    /// DPT depth model (transformers layout).
    Depth,
    /// U2-Net saliency model (converted to safetensors).
    Saliency,
    /// BERT-family caption encoder (transformers layout).
    Text,
    /// ResNet-50 image encoder (torchvision keys, safetensors).
    Image,
    /// Our trained RFNet checkpoint.
    Rfnet,
}

impl Role {
    pub const ALL: [Role; 7] = [
        Role::Base,
        Role::Controlnet,
        Role::Depth,
        Role::Saliency,
        Role::Text,
        Role::Image,
        Role::Rfnet,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Role::Base => "base",
            Role::Controlnet => "controlnet",
            Role::Depth => "depth",
            Role::Saliency => "saliency",
            Role::Text => "text",
            Role::Image => "image",
            Role::Rfnet => "rfnet",
        }
    }

    /// What to install, shown next to a missing or invalid model (details in models/README.md).
    pub fn install_hint(self) -> &'static str {
        // In the interface language (the texts live in ui-assets/i18n/*/models.toml).
        match self {
            Role::Base => crate::tr!("models.hint_base"),
            Role::Controlnet => crate::tr!("models.hint_controlnet"),
            Role::Depth => crate::tr!("models.hint_depth"),
            Role::Saliency => crate::tr!("models.hint_saliency"),
            Role::Text => crate::tr!("models.hint_text"),
            Role::Image => crate::tr!("models.hint_image"),
            Role::Rfnet => crate::tr!("models.hint_rfnet"),
        }
    }

    /// The global CLI flag that overrides this role's folder.
    pub fn flag(self) -> &'static str {
        match self {
            Role::Base => "--base-model",
            Role::Controlnet => "--controlnet-model",
            Role::Depth => "--depth-model",
            Role::Saliency => "--saliency-model",
            Role::Text => "--text-model",
            Role::Image => "--image-model",
            Role::Rfnet => "--rfnet-model",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("{path}: cannot read the model manifest: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: invalid model manifest: {reason}")]
    Parse { path: PathBuf, reason: String },
}

/// `models.toml` as written on disk.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManifestFile {
    /// True for manifests of random test weights (`models/tiny`): outputs are marked as such.
    #[serde(default)]
    pub test_weights: bool,
    /// Role -> folder, relative to the manifest's folder (or absolute).
    #[serde(default)]
    pub roles: BTreeMap<Role, PathBuf>,
}

/// A loaded manifest with paths resolved, plus per-role overrides from the command line.
#[derive(Clone, Debug)]
pub struct Manifest {
    /// The manifest file, if one was read.
    pub source: Option<PathBuf>,
    /// The folder `models.toml` was looked for in.
    pub dir: PathBuf,
    pub test_weights: bool,
    pub roles: BTreeMap<Role, PathBuf>,
}

impl Manifest {
    /// Read `DIR/models.toml`. A missing file is an empty manifest (every role missing).
    pub fn load(dir: &Path) -> Result<Self, ManifestError> {
        let path = dir.join("models.toml");
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Self {
                    source: None,
                    dir: dir.to_path_buf(),
                    test_weights: false,
                    roles: BTreeMap::new(),
                });
            }
            Err(source) => return Err(ManifestError::Io { path, source }),
        };
        let file: ManifestFile = toml::from_str(&text).map_err(|e| ManifestError::Parse {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        let roles = file
            .roles
            .into_iter()
            .map(|(role, p)| (role, if p.is_absolute() { p } else { dir.join(p) }))
            .collect();
        Ok(Self {
            source: Some(path),
            dir: dir.to_path_buf(),
            test_weights: file.test_weights,
            roles,
        })
    }

    /// Replace a role's folder (from a `--<role>-model` flag).
    pub fn set(&mut self, role: Role, path: PathBuf) {
        self.roles.insert(role, path);
    }

    pub fn path(&self, role: Role) -> Option<&Path> {
        self.roles.get(&role).map(PathBuf::as_path)
    }

    /// Check every role.
    pub fn check_all(&self) -> Vec<RoleReport> {
        Role::ALL.iter().map(|&r| self.check(r)).collect()
    }

    pub fn check(&self, role: Role) -> RoleReport {
        let status = match self.path(role) {
            None if self.source.is_none() => Status::Missing(if self.dir.is_dir() {
                crate::tr!("models.status_no_manifest", dir = self.dir.display(), flag = role.flag())
            } else {
                crate::tr!("models.status_no_manifest_no_dir", dir = self.dir.display(), flag = role.flag())
            }),
            None => Status::Missing(crate::tr!(
                "models.status_no_folder",
                role = role,
                manifest = self.source.as_ref().map(|p| p.display().to_string()).unwrap_or_default(),
                flag = role.flag()
            )),
            Some(path) if path.is_file() => check_single_file(role, path),
            Some(dir) => check_folder(role, dir),
        };
        RoleReport {
            role,
            path: self.path(role).map(Path::to_path_buf),
            status,
        }
    }
}

/// The state of one role's checkpoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "state", content = "detail", rename_all = "lowercase")]
pub enum Status {
    /// Present and its headers are valid; the detail summarises what was found.
    Found(String),
    /// Not there; the detail says what is missing.
    Missing(String),
    /// There but unusable; the detail says why.
    Invalid(String),
}

#[derive(Clone, Debug, Serialize)]
pub struct RoleReport {
    pub role: Role,
    pub path: Option<PathBuf>,
    pub status: Status,
}

/// A required file: one of several accepted names.
struct Need {
    sub: &'static str,
    any_of: &'static [&'static str],
    kind: FileKind,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum FileKind {
    Json,
    Safetensors,
    Text,
}

const DIFFUSERS_WEIGHTS: &[&str] = &[
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.fp16.safetensors",
];
const TRANSFORMERS_WEIGHTS: &[&str] = &["model.safetensors", "model.fp16.safetensors"];

fn needs(role: Role) -> Vec<Need> {
    use FileKind::*;
    let n = |sub, any_of, kind| Need { sub, any_of, kind };
    match role {
        Role::Base => vec![
            n("unet", &["config.json"], Json),
            n("unet", DIFFUSERS_WEIGHTS, Safetensors),
            n("vae", &["config.json"], Json),
            n("vae", DIFFUSERS_WEIGHTS, Safetensors),
            n("text_encoder", &["config.json"], Json),
            n("text_encoder", TRANSFORMERS_WEIGHTS, Safetensors),
            // vocab.json + merges.txt (transformers 4), or tokenizer.json alone (transformers 5);
            // the tokenizer's loader names whichever half is missing.
            n("tokenizer", &["vocab.json", "tokenizer.json"], Json),
            n("scheduler", &["scheduler_config.json"], Json),
        ],
        Role::Controlnet => vec![
            n("", &["config.json"], Json),
            n("", DIFFUSERS_WEIGHTS, Safetensors),
        ],
        Role::Depth => vec![
            n("", &["config.json"], Json),
            n("", TRANSFORMERS_WEIGHTS, Safetensors),
        ],
        Role::Saliency => vec![
            n("", &["config.json"], Json),
            n("", &["model.safetensors"], Safetensors),
        ],
        Role::Text => vec![
            n("", &["config.json"], Json),
            n("", TRANSFORMERS_WEIGHTS, Safetensors),
            n("", &["vocab.txt"], Text),
        ],
        Role::Image => vec![n("", &["model.safetensors"], Safetensors)],
        Role::Rfnet => vec![
            n("", &["config.json"], Json),
            n("", &["model.safetensors"], Safetensors),
        ],
    }
}

/// The first existing file of a requirement, preferring full precision.
pub fn find_weights(dir: &Path, names: &[&str]) -> Option<PathBuf> {
    names.iter().map(|n| dir.join(n)).find(|p| p.is_file())
}

/// A role given as one file: the base model and the ControlNet accept single-file checkpoints
/// (`models::single_file`); the layout detected from the tensors is reported.
fn check_single_file(role: Role, path: &Path) -> Status {
    use super::single_file::{Detected, detect, open_checkpoint};
    let wanted: fn(&Detected) -> bool = match role {
        Role::Base => |d| matches!(d, Detected::Sd1 { .. }),
        Role::Controlnet => |d| matches!(d, Detected::ControlNet { .. }),
        _ => {
            return Status::Invalid(crate::tr!("models.status_not_single_file", path = path.display(), role = role));
        }
    };
    let file = match open_checkpoint(path) {
        Ok(f) => f,
        Err(e) => return Status::Invalid(e.to_string()),
    };
    let detected = detect(file.tensors());
    if !wanted(&detected) {
        let expected = if role == Role::Base { crate::tr!("models.expected_sd1") } else { crate::tr!("models.expected_controlnet") };
        return Status::Invalid(crate::tr!(
            "models.status_wrong_kind",
            path = path.display(),
            detected = detected.describe(),
            expected = expected
        ));
    }
    Status::Found(format!("{}: {}", detected.describe(), tensor_summary(&file)))
}

/// "N tensors, SIZE, DTYPES" of a safetensors file, for `info`.
fn tensor_summary(file: &SafetensorsFile) -> String {
    let bytes: usize = file.tensors().values().map(|t| t.range.1 - t.range.0).sum();
    let mut dtypes: Vec<String> = file.tensors().values().map(|t| format!("{:?}", t.dtype)).collect();
    dtypes.sort();
    dtypes.dedup();
    crate::tr!(
        "models.tensor_summary",
        count = file.tensors().len(),
        size = human_bytes(bytes as u64),
        dtypes = dtypes.join("/")
    )
}

fn check_folder(role: Role, dir: &Path) -> Status {
    if !dir.is_dir() {
        return Status::Missing(crate::tr!("models.status_folder_absent", path = dir.display()));
    }
    let mut missing = Vec::new();
    let mut summary = Vec::new();
    for need in needs(role) {
        let sub = if need.sub.is_empty() {
            dir.to_path_buf()
        } else {
            dir.join(need.sub)
        };
        let Some(file) = find_weights(&sub, need.any_of) else {
            let shown = need
                .any_of
                .iter()
                .map(|n| {
                    if need.sub.is_empty() {
                        n.to_string()
                    } else {
                        format!("{}/{n}", need.sub)
                    }
                })
                .collect::<Vec<_>>()
                .join(crate::tr!("models.status_or"));
            missing.push(shown);
            continue;
        };
        match need.kind {
            FileKind::Json => {
                let parsed = std::fs::read_to_string(&file)
                    .map_err(|e| e.to_string())
                    .and_then(|t| {
                        serde_json::from_str::<serde_json::Value>(&t).map_err(|e| e.to_string())
                    });
                match parsed {
                    Ok(v) if v.is_object() => {}
                    Ok(_) => {
                        return Status::Invalid(crate::tr!("models.status_not_json_object", path = file.display()));
                    }
                    Err(e) => return Status::Invalid(format!("{}: {e}", file.display())),
                }
            }
            FileKind::Text => {
                if let Err(e) = std::fs::metadata(&file) {
                    return Status::Invalid(format!("{}: {e}", file.display()));
                }
            }
            FileKind::Safetensors => match SafetensorsFile::open(&file) {
                Ok(st) => {
                    let label = if need.sub.is_empty() { crate::tr!("models.weights_label") } else { need.sub };
                    summary.push(format!("{label}: {}", tensor_summary(&st)));
                }
                Err(e) => return Status::Invalid(e.to_string()),
            },
        }
    }
    if !missing.is_empty() {
        return Status::Missing(crate::tr!("models.status_lacks", dir = dir.display(), files = missing.join(", ")));
    }
    Status::Found(summary.join("; "))
}

pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}
