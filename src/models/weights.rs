//! The weight-loading layer: memory-mapped safetensors files (f32 / f16 / bf16), key remapping,
//! and loading into burn modules through burn-store's `ModuleSnapshot::apply`.
//!
//! Flow: `Weights::open(files)` validates every header (a truncated or foreign file fails here,
//! naming the file) -> `load_module(module, &weights, &remap, dtype)` walks the module *without
//! initialising it* (lazy params), computes the PyTorch-layout name and shape of every parameter,
//! checks them against the files (missing keys, wrong shapes, non-float dtypes: each error names
//! the file, the key, the expected and the found shape/dtype) and only then hands lazily-read
//! tensor snapshots to burn-store with the `PyTorchToBurnAdapter` (Linear transpose,
//! norm `weight/bias` -> `gamma/beta`).
//!
//! Models keep their own remapping tables next to them (`KeyRemap`), e.g. the CLIP text encoder
//! strips `text_model.` and the VAE maps the legacy `query/key/value/proj_attn` names.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;

use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{Bool, DType, Int, Tensor, TensorData};
use burn_store::{ModuleSnapshot, PyTorchToBurnAdapter, TensorSnapshot, TensorSnapshotError};
use memmap2::Mmap;
use regex::Regex;

/// Errors of the weight layer. Every variant names the file(s) involved.
#[derive(Debug, thiserror::Error)]
pub enum WeightError {
    #[error("{path}: cannot read weights file: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a valid safetensors file: {reason}")]
    Format { path: PathBuf, reason: String },
    #[error("{path}: tensor `{key}` has shape {found:?}, the model expects {expected:?}")]
    Shape {
        path: PathBuf,
        key: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error(
        "{path}: tensor `{key}` is stored as {found}, the model expects a float tensor (F32, F16 or BF16)"
    )]
    Dtype {
        path: PathBuf,
        key: String,
        found: String,
    },
    #[error("{files}: {} tensor(s) missing: {}{}", missing.len(), list(missing), unused_hint(unused))]
    Missing {
        files: FileList,
        missing: Vec<MissingKey>,
        unused: Vec<String>,
    },
    #[error("{files}: tensor `{key}` appears in more than one file")]
    Duplicate { files: FileList, key: String },
    #[error("{files}: {} tensor(s) in the files are not used by the model: {}", unused.len(), list(unused))]
    Unused { files: FileList, unused: Vec<String> },
    #[error("{files}: loading `{key}` failed: {reason}")]
    Apply {
        files: FileList,
        key: String,
        reason: String,
    },
    #[error("invalid key remapping rule `{pattern}`: {reason}")]
    BadRemap { pattern: String, reason: String },
    #[error(
        "{path}: {} tensor(s) hold NaN or Inf values ({}); the checkpoint is corrupt: reinstall or re-export it",
        keys.len(), list(keys)
    )]
    NonFinite { path: PathBuf, keys: Vec<String> },
}

/// First 10 hex digits of SHA-256 over a safetensors file's header: cheap even for 3 GB files,
/// it identifies the tensors' names, shapes and layout (not a full content hash). "unknown" when
/// the file cannot be read.
pub fn header_hash(path: &Path) -> String {
    use sha2::Digest;
    let Ok(bytes) = std::fs::File::open(path).and_then(|mut f| {
        use std::io::Read;
        let mut len = [0u8; 8];
        f.read_exact(&mut len)?;
        let n = u64::from_le_bytes(len).min(100_000_000) as usize;
        let mut header = vec![0u8; n];
        f.read_exact(&mut header)?;
        Ok(header)
    }) else {
        return "unknown".into();
    };
    sha2::Sha256::digest(&bytes).iter().take(5).map(|b| format!("{b:02x}")).collect()
}

/// A model's output held NaN or Inf values. Made by `NonFiniteOutput::diagnose`, which looks
/// for the cause in the model's weight files: non-finite weights mean a corrupt checkpoint
/// (models invalid); finite weights mean a numerical overflow (advice depends on the dtype).
#[derive(Clone, Debug)]
pub struct NonFiniteOutput {
    /// The model, e.g. "DPT depth model".
    pub model: String,
    /// What was not finite, e.g. "depth map".
    pub stage: String,
    pub dtype: DType,
    /// Weight files with non-finite tensors, and those tensors' names.
    pub bad_weights: Vec<(PathBuf, Vec<String>)>,
}

impl NonFiniteOutput {
    /// Scan `files` (unreadable ones are skipped: they would have failed to load) for the cause.
    pub fn diagnose(model: impl Into<String>, stage: impl Into<String>, dtype: DType, files: &[PathBuf]) -> Self {
        let bad_weights = files
            .iter()
            .filter_map(|f| {
                let bad = SafetensorsFile::open(f).ok()?.non_finite_tensors();
                (!bad.is_empty()).then(|| (f.clone(), bad))
            })
            .collect();
        Self {
            model: model.into(),
            stage: stage.into(),
            dtype,
            bad_weights,
        }
    }

    /// The weights themselves hold NaN or Inf values (the checkpoint is corrupt).
    pub fn weights_corrupt(&self) -> bool {
        !self.bad_weights.is_empty()
    }
}

impl fmt::Display for NonFiniteOutput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "the {} of the {} contain NaN or Inf values", self.stage, self.model)?;
        if let Some((file, keys)) = self.bad_weights.first() {
            let shown: Vec<&str> = keys.iter().take(3).map(String::as_str).collect();
            return write!(
                f,
                " because its weights do: {} has {} tensor(s) with NaN/Inf ({}{}); the checkpoint is corrupt: reinstall it",
                file.display(),
                keys.len(),
                shown.join(", "),
                if keys.len() > 3 { ", ..." } else { "" }
            );
        }
        match self.dtype {
            DType::F16 => write!(
                f,
                " (numerical overflow, typical of f16 with this model); rerun with `--dtype f32` or `--dtype bf16`"
            ),
            DType::BF16 => write!(f, " (numerical overflow in bf16); rerun with `--dtype f32`"),
            _ => write!(
                f,
                " although its weights are finite and the computation was in f32: an input far out of range or a numerical fault; please report it with the command line"
            ),
        }
    }
}

impl std::error::Error for NonFiniteOutput {}

/// A key the model needs but no file provides.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MissingKey {
    pub key: String,
    pub shape: Vec<usize>,
}

impl fmt::Display for MissingKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {:?}", self.key, self.shape)
    }
}

/// The files a weight set was read from, shown in error messages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileList(pub Vec<PathBuf>);

impl fmt::Display for FileList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<String> = self.0.iter().map(|p| p.display().to_string()).collect();
        f.write_str(&names.join(" + "))
    }
}

const LIST_LIMIT: usize = 12;

fn list<T: fmt::Display>(items: &[T]) -> String {
    let mut s: Vec<String> = items.iter().take(LIST_LIMIT).map(|i| format!("`{i}`")).collect();
    if items.len() > LIST_LIMIT {
        s.push(format!("... and {} more", items.len() - LIST_LIMIT));
    }
    s.join(", ")
}

fn unused_hint(unused: &[String]) -> String {
    if unused.is_empty() {
        String::new()
    } else {
        format!(
            "; the files have {} unused tensor(s): {} (a renamed key or the wrong checkpoint?)",
            unused.len(),
            list(unused)
        )
    }
}

/// One tensor entry of a safetensors header.
#[derive(Clone, Debug)]
pub struct TensorEntry {
    pub dtype: safetensors::Dtype,
    pub shape: Vec<usize>,
    /// Byte range inside the memory map (absolute).
    pub range: (usize, usize),
}

impl TensorEntry {
    pub fn is_float(&self) -> bool {
        matches!(
            self.dtype,
            safetensors::Dtype::F32 | safetensors::Dtype::F16 | safetensors::Dtype::BF16
        )
    }
}

/// A memory-mapped safetensors file with a validated header.
pub struct SafetensorsFile {
    path: PathBuf,
    mmap: Arc<Mmap>,
    tensors: BTreeMap<String, TensorEntry>,
    metadata: BTreeMap<String, String>,
}

impl fmt::Debug for SafetensorsFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SafetensorsFile")
            .field("path", &self.path)
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl SafetensorsFile {
    /// Open and validate a safetensors file (header and data extent; the data is not read).
    pub fn open(path: impl AsRef<Path>) -> Result<Self, WeightError> {
        let path = path.as_ref().to_path_buf();
        let io = |source| WeightError::Io {
            path: path.clone(),
            source,
        };
        let file = std::fs::File::open(&path).map_err(io)?;
        // SAFETY: the map is read-only; if another process truncates the file while we hold the
        // map, reads could fault — the same contract every mmap-based loader (PyTorch included) has.
        let mmap = unsafe { Mmap::map(&file) }.map_err(io)?;
        let (header_len, meta) =
            safetensors::SafeTensors::read_metadata(&mmap).map_err(|e| WeightError::Format {
                path: path.clone(),
                reason: describe_safetensors_error(&e, mmap.len()),
            })?;
        let data_start = 8 + header_len;
        let tensors = meta
            .tensors()
            .into_iter()
            .map(|(name, info)| {
                (
                    name,
                    TensorEntry {
                        dtype: info.dtype,
                        shape: info.shape.clone(),
                        range: (
                            data_start + info.data_offsets.0,
                            data_start + info.data_offsets.1,
                        ),
                    },
                )
            })
            .collect();
        let metadata = meta
            .metadata()
            .clone()
            .map(|m| m.into_iter().collect())
            .unwrap_or_default();
        Ok(Self {
            path,
            mmap: Arc::new(mmap),
            tensors,
            metadata,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn tensors(&self) -> &BTreeMap<String, TensorEntry> {
        &self.tensors
    }

    /// The file's bytes after its header: every tensor's data (what A1111's AutoV3 hash covers).
    pub fn data_bytes(&self) -> &[u8] {
        let header = self.mmap.get(..8).map_or(0, |b| u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) as usize);
        self.mmap.get(8 + header..).unwrap_or(&[])
    }

    /// The free-form `__metadata__` of the header.
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    /// Names of the float tensors holding a NaN or an infinity (see `non_finite`).
    pub fn non_finite_tensors(&self) -> Vec<String> {
        let names: Vec<&String> = self.tensors.keys().collect();
        non_finite(&self.mmap, &self.tensors, &names)
    }

    /// Read one tensor as f32 values (converting from f16/bf16).
    pub fn read_f32(&self, key: &str) -> Result<(Vec<f32>, Vec<usize>), WeightError> {
        let entry = self
            .tensors
            .get(key)
            .ok_or_else(|| missing_key(FileList(vec![self.path.clone()]), key))?;
        let data = entry_to_data(&self.mmap, entry, DType::F32).map_err(|reason| {
            WeightError::Dtype {
                path: self.path.clone(),
                key: key.to_string(),
                found: reason,
            }
        })?;
        let values = data.to_vec::<f32>().map_err(|e| WeightError::Apply {
            files: FileList(vec![self.path.clone()]),
            key: key.to_string(),
            reason: format!("{e:?}"),
        })?;
        Ok((values, entry.shape.clone()))
    }
}

/// Whether a stored float tensor holds a NaN or an infinity: a bit test per element on the
/// memory map (all exponent bits set), no conversion.
fn has_non_finite(mmap: &Mmap, entry: &TensorEntry) -> bool {
    use safetensors::Dtype as S;
    let bytes = &mmap[entry.range.0..entry.range.1];
    match entry.dtype {
        S::F32 => bytes
            .chunks_exact(4)
            .any(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) & 0x7f80_0000 == 0x7f80_0000),
        S::F16 => bytes.chunks_exact(2).any(|c| u16::from_le_bytes([c[0], c[1]]) & 0x7c00 == 0x7c00),
        S::BF16 => bytes.chunks_exact(2).any(|c| u16::from_le_bytes([c[0], c[1]]) & 0x7f80 == 0x7f80),
        _ => false,
    }
}

/// The `names` (tensors of one file) that hold NaN or Inf, scanned on all cores: every load
/// checks the weights it applies, so a corrupt checkpoint is refused by name instead of
/// producing silent NaN (or, after a ReLU, silently zero) outputs. About a second for 2 GB.
fn non_finite(mmap: &Mmap, tensors: &BTreeMap<String, TensorEntry>, names: &[&String]) -> Vec<String> {
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).clamp(1, 16);
    let chunk = names.len().div_ceil(threads).max(1);
    let mut bad: Vec<String> = std::thread::scope(|s| {
        let jobs: Vec<_> = names
            .chunks(chunk)
            .map(|part| {
                s.spawn(move || {
                    part.iter()
                        .filter(|n| tensors.get(n.as_str()).is_some_and(|e| has_non_finite(mmap, e)))
                        .map(|n| n.to_string())
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        jobs.into_iter().flat_map(|j| j.join().unwrap_or_default()).collect()
    });
    bad.sort();
    bad
}

fn describe_safetensors_error(e: &safetensors::SafeTensorError, file_len: usize) -> String {
    use safetensors::SafeTensorError as E;
    match e {
        E::HeaderTooSmall => format!("file is only {file_len} bytes, too short for a header"),
        E::InvalidHeaderLength => {
            "the header length points past the end of the file (truncated, or not safetensors)"
                .into()
        }
        E::HeaderTooLarge => "the declared header is implausibly large (not safetensors?)".into(),
        E::InvalidHeader(_) | E::InvalidHeaderDeserialization(_) | E::InvalidHeaderStart => {
            "the header is not valid safetensors JSON (not a safetensors file?)".into()
        }
        E::MetadataIncompleteBuffer => format!(
            "the file is truncated or has trailing bytes: its size ({file_len} bytes) does not match what the header declares"
        ),
        other => other.to_string(),
    }
}

/// Convert a stored tensor to `TensorData` of the requested float dtype.
fn entry_to_data(mmap: &Mmap, entry: &TensorEntry, target: DType) -> Result<TensorData, String> {
    use safetensors::Dtype as S;
    let bytes = &mmap[entry.range.0..entry.range.1];
    let shape = entry.shape.clone();
    let data = match entry.dtype {
        S::F32 => {
            let v: Vec<f32> = bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            TensorData::new(v, shape)
        }
        S::F16 => {
            let v: Vec<half::f16> = bytes
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]))
                .collect();
            TensorData::new(v, shape)
        }
        S::BF16 => {
            let v: Vec<half::bf16> = bytes
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]))
                .collect();
            TensorData::new(v, shape)
        }
        other => return Err(format!("{other:?}")),
    };
    Ok(if data.dtype == target {
        data
    } else {
        data.convert_dtype(target)
    })
}

/// A view of a file's keys: `None` hides a key (another component's tensor in a single-file
/// checkpoint), `Some` renames it (an original layout's key -> the diffusers key).
pub type KeyView = std::sync::Arc<dyn Fn(&str) -> Option<String> + Send + Sync>;

/// An ordered list of regex rewrite rules applied to checkpoint keys before matching them to the
/// model's (PyTorch-style) parameter names. The first matching rule wins. An optional view runs
/// before the rules.
#[derive(Clone, Default)]
pub struct KeyRemap {
    rules: Vec<(Regex, String)>,
    view: Option<KeyView>,
}

impl fmt::Debug for KeyRemap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyRemap")
            .field("rules", &self.rules)
            .field("view", &self.view.is_some())
            .finish()
    }
}

impl KeyRemap {
    pub fn new() -> Self {
        Self::default()
    }

    /// Add a rule: keys matching `pattern` are rewritten with `replacement` (`$1` etc. allowed).
    pub fn rule(mut self, pattern: &str, replacement: &str) -> Result<Self, WeightError> {
        let re = Regex::new(pattern).map_err(|e| WeightError::BadRemap {
            pattern: pattern.to_string(),
            reason: e.to_string(),
        })?;
        self.rules.push((re, replacement.to_string()));
        Ok(self)
    }

    /// Read the file's keys through `view` first (see `KeyView`).
    pub fn with_view(mut self, view: KeyView) -> Self {
        self.view = Some(view);
        self
    }

    /// The key the model sees for a file key, or `None` when the view hides it.
    pub fn map(&self, key: &str) -> Option<String> {
        match &self.view {
            Some(view) => view(key).map(|k| self.apply(&k)),
            None => Some(self.apply(key)),
        }
    }

    pub fn apply(&self, key: &str) -> String {
        for (re, rep) in &self.rules {
            if re.is_match(key) {
                return re.replace(key, rep.as_str()).into_owned();
            }
        }
        key.to_string()
    }
}

/// A set of safetensors files that together hold one model's weights (sharded checkpoints
/// are several files).
pub struct Weights {
    files: Vec<SafetensorsFile>,
}

impl Weights {
    pub fn open(paths: &[PathBuf]) -> Result<Self, WeightError> {
        let files = paths
            .iter()
            .map(SafetensorsFile::open)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self { files })
    }

    pub fn from_files(files: Vec<SafetensorsFile>) -> Self {
        Self { files }
    }

    pub fn files(&self) -> &[SafetensorsFile] {
        &self.files
    }

    /// Whether any file holds a tensor named `key` (as stored, before any remap).
    pub fn contains(&self, key: &str) -> bool {
        self.files.iter().any(|f| f.tensors.contains_key(key))
    }

    pub fn file_list(&self) -> FileList {
        FileList(self.files.iter().map(|f| f.path.clone()).collect())
    }

    /// Map from remapped key to (file index, original key). Errors on duplicates.
    fn index(&self, remap: &KeyRemap) -> Result<BTreeMap<String, (usize, String)>, WeightError> {
        let mut index = BTreeMap::new();
        for (i, file) in self.files.iter().enumerate() {
            for key in file.tensors.keys() {
                let Some(mapped) = remap.map(key) else { continue };
                if index.insert(mapped.clone(), (i, key.clone())).is_some() {
                    return Err(WeightError::Duplicate {
                        files: self.file_list(),
                        key: mapped,
                    });
                }
            }
        }
        Ok(index)
    }
}

/// What `load_module` did besides loading.
#[derive(Clone, Debug, Default)]
pub struct LoadReport {
    pub loaded: usize,
    /// Tensors present in the files that the model does not use (after remapping), when allowed.
    pub unused: Vec<String>,
}

/// How strict a load is about extra tensors in the files.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unused {
    /// Extra tensors are an error (parity fixtures, our own checkpoints).
    Deny,
    /// Extra tensors are reported in `LoadReport::unused` (buffers such as `position_ids`).
    Allow,
}

/// A parameter of a module: its PyTorch-style key and PyTorch-layout shape.
#[derive(Clone, Debug)]
pub struct ParamSlot {
    pub key: String,
    pub shape: Vec<usize>,
}

/// Walks a module without initialising lazy parameters and lists its parameters with the names
/// and shapes a PyTorch checkpoint would use.
struct SlotCollector {
    path: Vec<String>,
    containers: Vec<String>,
    slots: Vec<ParamSlot>,
}

impl SlotCollector {
    fn push(&mut self, shape: Vec<usize>) {
        let container = self
            .containers
            .iter()
            .rev()
            .find(|c| c.starts_with("Struct:") || c.starts_with("Enum:"))
            .cloned()
            .unwrap_or_default();
        let mut path = self.path.clone();
        let mut shape = shape;
        if let Some(last) = path.last_mut() {
            let is_norm = matches!(
                container.as_str(),
                "Struct:GroupNorm" | "Struct:LayerNorm" | "Struct:BatchNorm"
            );
            if is_norm {
                match last.as_str() {
                    "gamma" => *last = "weight".into(),
                    "beta" => *last = "bias".into(),
                    _ => {}
                }
            }
            if container == "Struct:Linear" && last == "weight" && shape.len() == 2 {
                shape.swap(0, 1);
            }
        }
        self.slots.push(ParamSlot {
            key: path.join("."),
            shape,
        });
    }
}

impl<B: Backend> ModuleVisitor<B> for SlotCollector {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        // Enum variants are not part of checkpoint keys (`resize` is a Conv2d or a
        // ConvTranspose2d under the same name); burn-store skips them too (see `load_module`).
        if !container_type.starts_with("Enum:") {
            self.path.push(name.to_string());
        }
        self.containers.push(container_type.to_string());
    }
    fn exit_module(&mut self, _name: &str, container_type: &str) {
        if !container_type.starts_with("Enum:") {
            self.path.pop();
        }
        self.containers.pop();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        self.push(param.lazy_shape().dims::<D>().to_vec());
    }
    fn visit_int<const D: usize>(&mut self, param: &Param<Tensor<B, D, Int>>) {
        self.push(param.lazy_shape().dims::<D>().to_vec());
    }
    fn visit_bool<const D: usize>(&mut self, param: &Param<Tensor<B, D, Bool>>) {
        self.push(param.lazy_shape().dims::<D>().to_vec());
    }
}

/// The parameters of `module` in PyTorch naming/layout, without initialising it.
pub fn param_slots<B: Backend, M: Module<B>>(module: &M) -> Vec<ParamSlot> {
    let mut c = SlotCollector {
        path: Vec::new(),
        containers: Vec::new(),
        slots: Vec::new(),
    };
    module.visit(&mut c);
    c.slots
}

/// Load `weights` into `module`, converting every tensor to `dtype`.
pub fn load_module<B: Backend, M: Module<B>>(
    mut module: M,
    weights: &Weights,
    remap: &KeyRemap,
    dtype: DType,
    unused_policy: Unused,
) -> Result<(M, LoadReport), WeightError> {
    let slots = param_slots::<B, M>(&module);
    let index = weights.index(remap)?;

    // 1. Validate names, dtypes and shapes before touching the module.
    let mut missing = Vec::new();
    let mut used = BTreeSet::new();
    for slot in &slots {
        match index.get(&slot.key) {
            None => missing.push(MissingKey {
                key: slot.key.clone(),
                shape: slot.shape.clone(),
            }),
            Some((fi, orig)) => {
                let file = &weights.files[*fi];
                let entry = &file.tensors[orig];
                if !entry.is_float() {
                    return Err(WeightError::Dtype {
                        path: file.path.clone(),
                        key: orig.clone(),
                        found: format!("{:?}", entry.dtype),
                    });
                }
                if entry.shape != slot.shape && !is_squeezed_conv(&entry.shape, &slot.shape) {
                    return Err(WeightError::Shape {
                        path: file.path.clone(),
                        key: orig.clone(),
                        expected: slot.shape.clone(),
                        found: entry.shape.clone(),
                    });
                }
                used.insert(slot.key.clone());
            }
        }
    }
    let unused: Vec<String> = index
        .iter()
        .filter(|(k, _)| !used.contains(*k))
        .map(|(_, (_, orig))| orig.clone())
        .collect();
    if !missing.is_empty() {
        return Err(WeightError::Missing {
            files: weights.file_list(),
            missing,
            unused,
        });
    }
    if unused_policy == Unused::Deny && !unused.is_empty() {
        return Err(WeightError::Unused {
            files: weights.file_list(),
            unused,
        });
    }
    for (fi, file) in weights.files.iter().enumerate() {
        let names: Vec<&String> = slots
            .iter()
            .filter_map(|slot| index.get(&slot.key))
            .filter(|(f, _)| *f == fi)
            .map(|(_, orig)| orig)
            .collect();
        let bad = non_finite(&file.mmap, &file.tensors, &names);
        if !bad.is_empty() {
            return Err(WeightError::NonFinite {
                path: file.path.clone(),
                keys: bad,
            });
        }
    }

    // 2. Lazy snapshots: the data is read (and converted) only when burn-store applies it.
    let snapshots: Vec<TensorSnapshot> = slots
        .iter()
        .map(|slot| {
            let (fi, orig) = &index[&slot.key];
            let file = &weights.files[*fi];
            let mut entry = file.tensors[orig].clone();
            // A 1x1 conv kernel stored for a Linear (legacy VAE attention): same values.
            entry.shape = slot.shape.clone();
            let mmap = file.mmap.clone();
            let key = orig.clone();
            let data_fn = Rc::new(move || {
                entry_to_data(&mmap, &entry, dtype).map_err(|reason| {
                    TensorSnapshotError::DataError(format!("{key}: unsupported dtype {reason}"))
                })
            });
            TensorSnapshot::from_closure(
                data_fn,
                dtype,
                burn::tensor::Shape::from(slot.shape.clone()),
                slot.key.split('.').map(str::to_string).collect(),
                Vec::new(),
                Default::default(),
            )
        })
        .collect();

    // 3. Apply through burn-store (Linear transpose, norm renames).
    let result = module.apply(snapshots, None, Some(Box::new(PyTorchToBurnAdapter)), true);
    if let Some(err) = result.errors.first() {
        return Err(WeightError::Apply {
            files: weights.file_list(),
            key: err.to_string(),
            reason: format!("{} error(s) while applying weights", result.errors.len()),
        });
    }
    if !result.missing.is_empty() {
        return Err(WeightError::Missing {
            files: weights.file_list(),
            missing: result
                .missing
                .iter()
                .map(|(k, _)| MissingKey {
                    key: k.clone(),
                    shape: Vec::new(),
                })
                .collect(),
            unused: Vec::new(),
        });
    }
    Ok((
        module,
        LoadReport {
            loaded: result.applied.len(),
            unused: if unused_policy == Unused::Allow {
                unused
            } else {
                Vec::new()
            },
        },
    ))
}

/// Read an integer tensor (I64 or I32) from a weight set, e.g. token ids in test fixtures.
pub fn read_ints(weights: &Weights, key: &str) -> Result<(Vec<i64>, Vec<usize>), WeightError> {
    for file in &weights.files {
        if let Some(entry) = file.tensors.get(key) {
            let bytes = &file.mmap[entry.range.0..entry.range.1];
            let values = match entry.dtype {
                safetensors::Dtype::I64 => bytes
                    .chunks_exact(8)
                    .map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
                    .collect(),
                safetensors::Dtype::I32 => bytes
                    .chunks_exact(4)
                    .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64)
                    .collect(),
                other => {
                    return Err(WeightError::Dtype {
                        path: file.path.clone(),
                        key: key.to_string(),
                        found: format!("{other:?} (expected I64 or I32)"),
                    });
                }
            };
            return Ok((values, entry.shape.clone()));
        }
    }
    Err(missing_key(weights.file_list(), key))
}

/// The error for one plain tensor (not a module parameter) that no file holds.
fn missing_key(files: FileList, key: &str) -> WeightError {
    WeightError::Missing {
        files,
        missing: vec![MissingKey {
            key: key.to_string(),
            shape: Vec::new(),
        }],
        unused: Vec::new(),
    }
}

/// `[o, i, 1, 1]` stored where the model has a Linear `[o, i]`: the same matrix.
fn is_squeezed_conv(found: &[usize], expected: &[usize]) -> bool {
    found.len() == expected.len() + 2 && found.ends_with(&[1, 1]) && found[..expected.len()] == *expected
}

/// Read a plain tensor (not a module parameter) from a weight set, e.g. test inputs.
pub fn read_tensor<B: Backend, const D: usize>(
    weights: &Weights,
    key: &str,
    device: &B::Device,
) -> Result<Tensor<B, D>, WeightError> {
    for file in &weights.files {
        if file.tensors.contains_key(key) {
            let (values, shape) = file.read_f32(key)?;
            if shape.len() != D {
                return Err(WeightError::Shape {
                    path: file.path.clone(),
                    key: key.to_string(),
                    expected: vec![0; D],
                    found: shape,
                });
            }
            return Ok(Tensor::from_data(TensorData::new(values, shape), device));
        }
    }
    Err(missing_key(weights.file_list(), key))
}

/// Save a module's parameters as a safetensors file with PyTorch names and layouts (Linear
/// weights transposed back, norm `gamma/beta` -> `weight/bias`), in f32, written atomically.
/// The inverse of `load_module` with an empty remap.
pub fn save_module<B: Backend, M: Module<B>>(
    module: &M,
    path: &Path,
    metadata: &[(&str, &str)],
) -> Result<usize, WeightError> {
    save_module_renamed(module, path, metadata, &|k: &str| k.to_string())
}

/// `save_module` with every key passed through `rename` (e.g. module paths -> a public
/// checkpoint's key names, the inverse of a load remap).
pub fn save_module_renamed<B: Backend, M: Module<B>>(
    module: &M,
    path: &Path,
    metadata: &[(&str, &str)],
    rename: &dyn Fn(&str) -> String,
) -> Result<usize, WeightError> {
    use burn_store::BurnToPyTorchAdapter;
    let snapshots = module.collect(None, Some(Box::new(BurnToPyTorchAdapter)), true);
    let io = |e: String| WeightError::Io {
        path: path.to_path_buf(),
        source: std::io::Error::other(e),
    };
    let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::with_capacity(snapshots.len());
    for snap in &snapshots {
        let data = snap.to_data().map_err(|e| io(format!("{}: {e:?}", snap.full_path())))?;
        let shape = data.shape.to_vec();
        let values = data
            .convert::<f32>()
            .to_vec::<f32>()
            .map_err(|e| io(format!("{}: {e:?}", snap.full_path())))?;
        tensors.push((rename(&snap.full_path()), shape, values));
    }
    let meta = metadata.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    let bytes = serialize_f32(&tensors, meta).map_err(io)?;
    crate::files::write_atomic(path, &bytes).map_err(|e| io(e.to_string()))?;
    Ok(tensors.len())
}

/// f32 tensors (name, shape, values) as the bytes of a safetensors file (little-endian; the
/// format sorts the names). The one serialiser of every file rfstudio writes weights to.
pub fn serialize_f32(
    tensors: &[(String, Vec<usize>, Vec<f32>)],
    metadata: std::collections::HashMap<String, String>,
) -> Result<Vec<u8>, String> {
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, _, v)| v.iter().flat_map(|x| x.to_le_bytes()).collect())
        .collect();
    let views = tensors
        .iter()
        .zip(&bytes)
        .map(|((k, shape, _), b)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), b)
                .map(|v| (k.clone(), v))
                .map_err(|e| format!("{k}: {e}"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    safetensors::serialize(views, Some(metadata)).map_err(|e| e.to_string())
}
