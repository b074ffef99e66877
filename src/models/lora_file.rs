//! LoRA files as people share them, applied to a loaded SD 1.x UNet / CLIP text encoder at a
//! strength: `W += strength * (alpha / rank) * up @ down` for every adapted layer (Linear, 1x1
//! and 3x3 convolutions). Two formats:
//!
//! | format | keys | scale |
//! |---|---|---|
//! | kohya / A1111 | `lora_unet_<diffusers path, dots as _>.lora_down.weight` / `.lora_up.weight` / `.alpha`; `lora_te_text_model_<...>` for the text encoder | `alpha / rank` (`alpha` absent: 1) |
//! | diffusers / PEFT | `unet.<diffusers path>.lora_A.weight` / `.lora_B.weight`; `text_encoder.text_model.<...>`; older diffusers files `...processor.to_q_lora.down.weight` / `.up.weight` | `alpha / rank` from a `.alpha` tensor or the file's `lora_adapter_metadata`, else 1 |
//!
//! A file whose layers match nothing in the model (a LoRA for SDXL, SD 2.x, ...) is refused with
//! what was detected; a layer whose shapes do not fit is refused naming the key and both shapes.
//! Training-time adapters (RFFT's) are `models::lora`; this module only merges files.

use std::collections::{BTreeMap, HashMap};

use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};

use super::lora::{WeightLayer, add_deltas, weight_layers};
use super::weights::{SafetensorsFile, WeightError};

#[derive(Debug, thiserror::Error)]
pub enum LoraError {
    #[error(transparent)]
    Weights(#[from] WeightError),
    #[error("{}: not a LoRA: no lora_down/lora_up or lora_A/lora_B tensors", path.display())]
    NotLora { path: PathBuf },
    #[error("{}: a {what} LoRA; only plain low-rank LoRAs (kohya lora_down/lora_up, PEFT lora_A/lora_B) are supported", path.display())]
    Unsupported { path: PathBuf, what: &'static str },
    #[error("{}: a LoRA for {detected}, not for Stable Diffusion 1.x: {unmatched} of its {total} layers match nothing in the SD 1.x {component} (e.g. `{example}`)", path.display())]
    OtherArchitecture {
        path: PathBuf,
        detected: String,
        component: &'static str,
        unmatched: usize,
        total: usize,
        example: String,
    },
    #[error("{}: LoRA layer `{key}`: {reason}", path.display())]
    Layer { path: PathBuf, key: String, reason: String },
    #[error("{spec:?}: expected FILE or FILE:STRENGTH with a number for STRENGTH (e.g. style.safetensors:0.8)")]
    Spec { spec: String },
}

/// A LoRA to apply: its file and strength (A1111's `<lora:name:strength>`).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LoraSpec {
    pub path: PathBuf,
    pub strength: f32,
}

impl LoraSpec {
    /// `FILE` (strength 1) or `FILE:STRENGTH`.
    pub fn parse(spec: &str) -> Result<Self, LoraError> {
        if let Some((file, strength)) = spec.rsplit_once(':')
            && !file.is_empty()
            && !strength.contains(['/', '\\'])
        {
            let strength: f32 = strength.trim().parse().map_err(|_| LoraError::Spec { spec: spec.to_string() })?;
            if !strength.is_finite() {
                return Err(LoraError::Spec { spec: spec.to_string() });
            }
            return Ok(Self {
                path: PathBuf::from(file),
                strength,
            });
        }
        Ok(Self {
            path: PathBuf::from(spec),
            strength: 1.0,
        })
    }

    /// The name A1111 shows (`<lora:NAME:...>`): the file stem.
    pub fn name(&self) -> String {
        self.path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default()
    }
}

/// Which model a LoRA layer adapts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Component {
    Unet,
    TextEncoder,
    /// rfstudio's own kohya-style files for a ControlNet (`lora_controlnet_*`, written by
    /// `rfft export --format kohya-lora`).
    ControlNet,
}

/// One low-rank pair of a file.
#[derive(Clone, Debug)]
struct Pair {
    down: String,
    up: String,
    alpha: Option<String>,
}

/// A LoRA file's layers, by component and public module path (diffusers / transformers names).
pub struct LoraFile {
    pub path: PathBuf,
    file: SafetensorsFile,
    layers: BTreeMap<(Component, String), Pair>,
    /// `lora_alpha` from the header (diffusers' `lora_adapter_metadata`), for files without
    /// `.alpha` tensors.
    metadata_alpha: Option<f32>,
}

impl LoraFile {
    pub fn open(path: &Path) -> Result<Self, LoraError> {
        let file = SafetensorsFile::open(path)?;
        // DoRA adds a magnitude vector per layer: merging only its low-rank part would be wrong.
        if file.tensors().keys().any(|k| k.contains("lora_magnitude_vector") || k.contains("dora_scale")) {
            return Err(LoraError::Unsupported {
                path: path.to_path_buf(),
                what: "DoRA",
            });
        }
        let mut layers = BTreeMap::new();
        for key in file.tensors().keys() {
            // kohya / A1111
            if let Some(module) = key.strip_suffix(".lora_down.weight") {
                let (component, name) = match kohya_component(module) {
                    Some(x) => x,
                    None => (Component::Unet, module.to_string()),
                };
                let alpha = format!("{module}.alpha");
                layers.insert(
                    (component, name),
                    Pair {
                        down: key.clone(),
                        up: format!("{module}.lora_up.weight"),
                        alpha: file.tensors().contains_key(&alpha).then_some(alpha),
                    },
                );
                continue;
            }
            // PEFT / current diffusers
            let peft = key
                .strip_suffix(".lora_A.weight")
                .map(|m| (m, ".lora_A.weight", ".lora_B.weight"))
                .or_else(|| key.strip_suffix(".lora_A.default.weight").map(|m| (m, ".lora_A.default.weight", ".lora_B.default.weight")));
            if let Some((module, _, b)) = peft {
                let (component, name) = peft_component(module);
                let alpha = format!("{module}.alpha");
                layers.insert(
                    (component, name),
                    Pair {
                        down: key.clone(),
                        up: format!("{module}{b}"),
                        alpha: file.tensors().contains_key(&alpha).then_some(alpha),
                    },
                );
                continue;
            }
            // older diffusers attention processors: `...processor.to_q_lora.down.weight`
            if let Some(module) = key.strip_suffix("_lora.down.weight") {
                let up = format!("{module}_lora.up.weight");
                let module = module.replace(".processor.", ".").replace(".to_out", ".to_out.0").replace("to_out.0.0", "to_out.0");
                let (component, name) = peft_component(&module);
                layers.insert(
                    (component, name),
                    Pair {
                        down: key.clone(),
                        up,
                        alpha: None,
                    },
                );
            }
        }
        if layers.is_empty() {
            return Err(LoraError::NotLora { path: path.to_path_buf() });
        }
        let metadata_alpha = file
            .metadata()
            .get("lora_adapter_metadata")
            .and_then(|m| serde_json::from_str::<serde_json::Value>(m).ok())
            .and_then(|v| v.get("lora_alpha").and_then(|a| a.as_f64()))
            .map(|a| a as f32);
        Ok(Self {
            path: path.to_path_buf(),
            file,
            layers,
            metadata_alpha,
        })
    }

    /// Number of adapted layers.
    pub fn len(&self) -> usize {
        self.layers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.layers.is_empty()
    }

    /// A1111's AutoV3 hash: the first 12 hex digits of SHA-256 over the file after its header.
    pub fn autov3_hash(&self) -> String {
        use sha2::Digest;
        sha2::Sha256::digest(self.file.data_bytes()).iter().take(6).map(|b| format!("{b:02x}")).collect()
    }

    /// What the file was made for, from its key names (for the error when nothing matches).
    fn detected(&self) -> String {
        let keys = self.file.tensors().keys();
        let mut sdxl = false;
        let mut sd2 = false;
        for k in keys {
            if k.starts_with("lora_te2_") || k.contains("text_encoder_2") || k.contains("add_embedding") {
                sdxl = true;
            }
            if k.contains("resblocks") || k.contains("model_transformer") {
                sd2 = true;
            }
        }
        if sdxl {
            "Stable Diffusion XL (a second text encoder)".into()
        } else if sd2 {
            "Stable Diffusion 2.x (OpenCLIP text encoder)".into()
        } else {
            "another architecture".into()
        }
    }

    /// Apply the layers of `component` to `module` at `strength`. `public` maps a module
    /// parameter path to the public key of that component's checkpoints (diffusers for the
    /// UNet, transformers without `text_model.` for CLIP). Returns the module and the number of
    /// layers applied.
    pub fn apply<B: Backend, M: Module<B>>(
        &self,
        module: M,
        component: Component,
        strength: f32,
        public: &dyn Fn(&str) -> String,
    ) -> Result<(M, usize), LoraError> {
        let wanted: Vec<(&String, &Pair)> =
            self.layers.iter().filter(|((c, _), _)| *c == component).map(|((_, name), p)| (name, p)).collect();
        if wanted.is_empty() {
            return Ok((module, 0));
        }
        // Our weights by public module path (and its kohya spelling).
        let mut by_public: HashMap<String, (String, bool, Vec<usize>)> = HashMap::new();
        let mut by_kohya: HashMap<String, String> = HashMap::new();
        for WeightLayer { path, linear, shape } in weight_layers::<B, M>(&module) {
            let Some(module_path) = public(&path).strip_suffix(".weight").map(str::to_string) else { continue };
            let full = match component {
                Component::Unet | Component::ControlNet => module_path.clone(),
                Component::TextEncoder => format!("text_model.{module_path}"),
            };
            by_kohya.insert(full.replace('.', "_"), full.clone());
            by_public.insert(full, (path, linear, shape));
        }
        let Some(device) = module.devices().into_iter().next() else {
            return Ok((module, 0));
        };
        let mut deltas: HashMap<String, Tensor<B, 2>> = HashMap::new();
        let mut unmatched = Vec::new();
        for (name, pair) in &wanted {
            // Text-encoder paths come with or without transformers' `text_model.` level (PEFT
            // files written against transformers 5's flattened CLIPTextModel have none).
            let prefixed = format!("text_model.{name}");
            let public_name = if by_public.contains_key(*name) {
                Some((*name).clone())
            } else if component == Component::TextEncoder && by_public.contains_key(&prefixed) {
                Some(prefixed)
            } else {
                by_kohya.get(*name).cloned()
            };
            let Some(target) = public_name.and_then(|p| by_public.get(&p)) else {
                unmatched.push((*name).clone());
                continue;
            };
            let (path, linear, shape) = target;
            let delta = self.factors(pair, shape, *linear, strength)?.delta::<B>(&device);
            deltas.insert(path.clone(), delta);
        }
        if !unmatched.is_empty() && unmatched.len() * 2 >= wanted.len() {
            return Err(LoraError::OtherArchitecture {
                path: self.path.clone(),
                detected: self.detected(),
                component: match component {
                    Component::Unet => "UNet",
                    Component::TextEncoder => "text encoder",
                    Component::ControlNet => "ControlNet",
                },
                unmatched: unmatched.len(),
                total: wanted.len(),
                example: unmatched[0].clone(),
            });
        }
        if let Some(name) = unmatched.first() {
            return Err(LoraError::Layer {
                path: self.path.clone(),
                key: name.clone(),
                reason: format!("no such layer in the SD 1.x model ({} of {} layers unmatched)", unmatched.len(), wanted.len()),
            });
        }
        let applied = deltas.len();
        Ok((add_deltas(module, deltas), applied))
    }

    /// The factors of one layer, checked against a weight of `shape`: (up [out, r], down
    /// [r, inner], scale = strength * alpha / r).
    fn factors(&self, pair: &Pair, shape: &[usize], linear: bool, strength: f32) -> Result<Factors, LoraError> {
        let layer_err = |reason: String| LoraError::Layer {
            path: self.path.clone(),
            key: pair.down.clone(),
            reason,
        };
        if !self.file.tensors().contains_key(&pair.up) {
            return Err(layer_err(format!("its up matrix `{}` is missing", pair.up)));
        }
        let (down, down_shape) = self.file.read_f32(&pair.down)?;
        let (up, up_shape) = self.file.read_f32(&pair.up)?;
        let rank = *down_shape.first().ok_or_else(|| layer_err("empty down matrix".into()))?;
        let inner: usize = down_shape[1..].iter().product();
        let out = *up_shape.first().ok_or_else(|| layer_err("empty up matrix".into()))?;
        if rank == 0 || up_shape.get(1) != Some(&rank) || up_shape[2..].iter().any(|&d| d != 1) {
            return Err(layer_err(format!("down {down_shape:?} and up {up_shape:?} do not form a rank-{rank} pair")));
        }
        // The PyTorch-layout shape of the adapted weight: [out, in] or [out, in, kh, kw].
        let torch_shape: Vec<usize> = if linear { vec![shape[1], shape[0]] } else { shape.to_vec() };
        let torch_inner: usize = torch_shape[1..].iter().product();
        if torch_shape[0] != out || torch_inner != inner {
            return Err(layer_err(format!(
                "the layer's weight is {torch_shape:?}, the LoRA gives up {up_shape:?} x down {down_shape:?}"
            )));
        }
        let alpha = match &pair.alpha {
            Some(k) => self.file.read_f32(k)?.0.first().copied().unwrap_or(rank as f32),
            None => self.metadata_alpha.unwrap_or(rank as f32),
        };
        Ok(Factors {
            up,
            down,
            out,
            rank,
            inner,
            scale: strength * alpha / rank as f32,
        })
    }
}

/// One layer's low-rank factors, flattened (row-major).
struct Factors {
    up: Vec<f32>,
    down: Vec<f32>,
    out: usize,
    rank: usize,
    inner: usize,
    scale: f32,
}

impl Factors {
    /// `scale * up @ down`: [out, inner], on `device`.
    fn delta<B: Backend>(self, device: &B::Device) -> Tensor<B, 2> {
        let up = Tensor::<B, 2>::from_data(TensorData::new(self.up, [self.out, self.rank]), device);
        let down = Tensor::<B, 2>::from_data(TensorData::new(self.down, [self.rank, self.inner]), device);
        up.matmul(down).mul_scalar(self.scale)
    }
}

/// The kohya-style prefix of ControlNet layers in rfstudio's LoRA exports.
pub const CONTROLNET_PREFIX: &str = "lora_controlnet_";

/// One layer for `write_kohya`: the public module path (diffusers names, dots), the factors in
/// PyTorch's layout (`down` [r, in] or [r, in, 1, 1], `up` [out, r] or [out, r, 1, 1]) and alpha.
pub struct KohyaLayer {
    pub module: String,
    pub down: (Vec<f32>, Vec<usize>),
    pub up: (Vec<f32>, Vec<usize>),
    pub alpha: f32,
}

/// Write a kohya-format LoRA (`<prefix><module with _>.lora_down.weight`, `.lora_up.weight`,
/// `.alpha`; f32), atomically.
pub fn write_kohya(path: &Path, prefix: &str, layers: &[KohyaLayer], metadata: &[(&str, &str)]) -> Result<usize, WeightError> {
    let io = |reason: String| WeightError::Io {
        path: path.to_path_buf(),
        source: std::io::Error::other(reason),
    };
    let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
    for l in layers {
        let name = format!("{prefix}{}", l.module.replace('.', "_"));
        tensors.push((format!("{name}.lora_down.weight"), l.down.1.clone(), l.down.0.clone()));
        tensors.push((format!("{name}.lora_up.weight"), l.up.1.clone(), l.up.0.clone()));
        tensors.push((format!("{name}.alpha"), vec![], vec![l.alpha]));
    }
    let meta = metadata.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    let out = super::weights::serialize_f32(&tensors, meta).map_err(io)?;
    crate::files::write_atomic(path, &out).map_err(|e| io(e.to_string()))?;
    Ok(layers.len())
}

/// A file's component from a kohya module name: `lora_unet_*` or `lora_te_*` (SD 1.x's one text
/// encoder). Returns the name without the prefix (underscored).
fn kohya_component(module: &str) -> Option<(Component, String)> {
    if let Some(rest) = module.strip_prefix("lora_unet_") {
        return Some((Component::Unet, rest.to_string()));
    }
    if let Some(rest) = module.strip_prefix("lora_te_").or_else(|| module.strip_prefix("lora_te1_")) {
        return Some((Component::TextEncoder, rest.to_string()));
    }
    if let Some(rest) = module.strip_prefix(CONTROLNET_PREFIX) {
        return Some((Component::ControlNet, rest.to_string()));
    }
    None
}

/// A PEFT / diffusers module path: `unet.*` or `text_encoder.*`.
fn peft_component(module: &str) -> (Component, String) {
    if let Some(rest) = module.strip_prefix("unet.") {
        return (Component::Unet, rest.to_string());
    }
    if let Some(rest) = module.strip_prefix("text_encoder.") {
        return (Component::TextEncoder, rest.to_string());
    }
    (Component::Unet, module.to_string())
}
