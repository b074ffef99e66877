//! Reading PyTorch checkpoints (`torch.save` zip archives, legacy and plain pickles) through
//! burn-store's `PytorchReader`, and writing f32 safetensors files. Used by the one-time
//! converters (`rfstudio convert ...`); models themselves only ever load safetensors.
//!
//! A state dict saved inside a training checkpoint (`{"state_dict": {...}, "optimizer": ...}`)
//! is taken from its `state_dict` entry, and the `module.` prefix of `nn.DataParallel` is dropped.

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};

use burn::tensor::DType;
use burn_store::TensorSnapshot;
use burn_store::pytorch::{PytorchError, PytorchReader};

/// Errors reading a `.pth` or writing safetensors. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum PthError {
    #[error("{path}: cannot read: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path}: not a readable PyTorch checkpoint: {reason}")]
    Format { path: PathBuf, reason: String },
    #[error("{path}: tensor `{key}`: {reason}")]
    Tensor {
        path: PathBuf,
        key: String,
        reason: String,
    },
    #[error("{path}: cannot encode safetensors: {reason}")]
    Encode { path: PathBuf, reason: String },
}

/// One tensor of a state dict, converted to f32.
#[derive(Clone, Debug, PartialEq)]
pub struct F32Tensor {
    pub shape: Vec<usize>,
    pub values: Vec<f32>,
}

/// A state dict read from a `.pth`: tensor name -> lazily readable tensor.
pub struct StateDict {
    path: PathBuf,
    tensors: BTreeMap<String, TensorSnapshot>,
}

impl StateDict {
    /// Read the tensor index of a PyTorch checkpoint (the tensor data stays in the file).
    pub fn open(path: &Path) -> Result<Self, PthError> {
        let kind = sniff(path)?;
        if let Kind::Safetensors = kind {
            return Err(PthError::Format {
                path: path.to_path_buf(),
                reason: "this is a safetensors file, not a PyTorch .pth: it needs no conversion \
                         (put it in the model folder as model.safetensors next to a config.json)"
                    .into(),
            });
        }
        let reader = read_guarded(path).map_err(|error| PthError::Format {
            path: path.to_path_buf(),
            reason: match (kind, error) {
                // the reader falls back to parsing a zip it cannot open as a plain pickle
                (Kind::Zip, Some(PytorchError::Pickle(_))) => {
                    "a damaged or truncated zip archive (its directory cannot be read)".into()
                }
                (Kind::Zip | Kind::Pickle, Some(e)) => format!("a damaged or truncated file: {e}"),
                (Kind::Zip | Kind::Pickle, None) => {
                    "a damaged or truncated file (the pickle parser gave up on it)".into()
                }
                _ => "neither a torch.save zip archive nor a pickle".into(),
            },
        })?;
        let tensors = unwrap_state_dict(reader.into_tensors());
        if tensors.is_empty() {
            return Err(PthError::Format {
                path: path.to_path_buf(),
                reason: "it holds no tensors (a whole pickled model instead of a state dict?)"
                    .into(),
            });
        }
        Ok(Self {
            path: path.to_path_buf(),
            tensors,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Tensor names and shapes, sorted by name.
    pub fn shapes(&self) -> BTreeMap<String, Vec<usize>> {
        self.tensors
            .iter()
            .map(|(k, t)| (k.clone(), t.shape.to_vec()))
            .collect()
    }

    /// The stored dtype of `key`, if present.
    pub fn dtype(&self, key: &str) -> Option<DType> {
        self.tensors.get(key).map(|t| t.dtype)
    }

    /// Read one float tensor (f64 / f32 / f16 / bf16) as f32 values.
    pub fn read_f32(&self, key: &str) -> Result<F32Tensor, PthError> {
        let err = |reason: String| PthError::Tensor {
            path: self.path.clone(),
            key: key.to_string(),
            reason,
        };
        let Some(snapshot) = self.tensors.get(key) else {
            return Err(err("missing".into()));
        };
        if !matches!(
            snapshot.dtype,
            DType::F64 | DType::F32 | DType::F16 | DType::BF16
        ) {
            return Err(err(format!(
                "stored as {:?}, expected a float tensor",
                snapshot.dtype
            )));
        }
        let data = snapshot
            .to_data()
            .map_err(|e| err(format!("cannot read its data (truncated file?): {e}")))?;
        let shape = data.shape.to_vec();
        let values = data
            .convert_dtype(DType::F32)
            .to_vec::<f32>()
            .map_err(|e| err(format!("{e:?}")))?;
        if values.len() != shape.iter().product::<usize>() {
            return Err(err(format!(
                "holds {} values for shape {shape:?}",
                values.len()
            )));
        }
        Ok(F32Tensor { shape, values })
    }
}

#[derive(Clone, Copy)]
enum Kind {
    Zip,
    Pickle,
    Safetensors,
    Other,
}

/// Look at the first bytes to give a precise error for the common wrong inputs.
fn sniff(path: &Path) -> Result<Kind, PthError> {
    let io = |error| PthError::Io {
        path: path.to_path_buf(),
        error,
    };
    let mut file = std::fs::File::open(path).map_err(io)?;
    let mut head = [0u8; 9];
    let mut n = 0;
    while n < head.len() {
        let read = file.read(&mut head[n..]).map_err(io)?;
        if read == 0 {
            break;
        }
        n += read;
    }
    let head = &head[..n];
    Ok(if head.starts_with(b"PK") {
        Kind::Zip
    } else if head.first() == Some(&0x80) {
        Kind::Pickle
    } else if head.len() == 9 && head[8] == b'{' {
        Kind::Safetensors
    } else {
        Kind::Other
    })
}

/// `PytorchReader::new`, with a panic inside the pickle parser turned into an error (`None`).
fn read_guarded(path: &Path) -> Result<PytorchReader, Option<PytorchError>> {
    let owned = path.to_path_buf();
    match std::panic::catch_unwind(move || PytorchReader::new(&owned)) {
        Ok(Ok(reader)) => Ok(reader),
        Ok(Err(e)) => Err(Some(e)),
        Err(_) => Err(None),
    }
}

/// Take the `state_dict` entry of a training checkpoint and drop a `module.` prefix.
fn unwrap_state_dict(tensors: HashMap<String, TensorSnapshot>) -> BTreeMap<String, TensorSnapshot> {
    let nested = tensors.keys().any(|k| k.starts_with("state_dict."));
    let tensors: BTreeMap<String, TensorSnapshot> = tensors
        .into_iter()
        .filter_map(|(k, t)| match nested {
            true => k.strip_prefix("state_dict.").map(|s| (s.to_string(), t)),
            false => Some((k, t)),
        })
        .collect();
    if !tensors.is_empty() && tensors.keys().all(|k| k.starts_with("module.")) {
        tensors
            .into_iter()
            .map(|(k, t)| (k["module.".len()..].to_string(), t))
            .collect()
    } else {
        tensors
    }
}

/// Serialise f32 tensors as a safetensors file (little-endian, keys sorted by the format).
pub fn safetensors_f32_bytes(
    path: &Path,
    tensors: &BTreeMap<String, F32Tensor>,
    metadata: HashMap<String, String>,
) -> Result<Vec<u8>, PthError> {
    let tensors: Vec<(String, Vec<usize>, Vec<f32>)> =
        tensors.iter().map(|(k, t)| (k.clone(), t.shape.clone(), t.values.clone())).collect();
    super::weights::serialize_f32(&tensors, metadata).map_err(|reason| PthError::Encode {
        path: path.to_path_buf(),
        reason,
    })
}
