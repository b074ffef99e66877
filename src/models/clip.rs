//! CLIP text side of Stable Diffusion 1.x: the BPE tokenizer built from the checkpoint's own
//! `tokenizer/vocab.json` + `merges.txt` (or `tokenizer.json`), and the text transformer (`text_encoder/`).
//!
//! | ours               | reference                                                        |
//! |--------------------|------------------------------------------------------------------|
//! | `ClipTokenizer`    | transformers `CLIPTokenizer` (tokenizers backend: NFC, whitespace collapse, lower-case, CLIP split regex, byte-level BPE with `</w>`, BOS/EOS) |
//! | `ClipTextModel`    | transformers `CLIPTextModel` (`text_model.*` keys)                |
//!
//! Checkpoint keys: real SD 1.5 files carry a `text_model.` prefix, transformers 5 saves without
//! it; both load (remap below). Older files carry an `embeddings.position_ids` buffer, ignored.

use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::nn::{Embedding, EmbeddingConfig, LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::tensor::activation::{gelu, sigmoid};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use serde::Deserialize;

use super::diffusers_blocks::{merge_heads, split_heads};
use super::fused::sdpa;
use super::weights::{KeyRemap, LoadReport, Unused, WeightError, Weights, load_module};

#[derive(Debug, thiserror::Error)]
pub enum ClipError {
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error(transparent)]
    Weights(#[from] WeightError),
}

// ---------------------------------------------------------------------------------------------
// Tokenizer
// ---------------------------------------------------------------------------------------------

/// The CLIP BPE tokenizer, padded/truncated to `max_length` (77) as SD pipelines call it.
pub struct ClipTokenizer {
    inner: tokenizers::Tokenizer,
    pub bos_id: u32,
    pub eos_id: u32,
    pub pad_id: u32,
    pub max_length: usize,
}

/// One encoded prompt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Encoded {
    /// Exactly `max_length` ids: BOS, tokens, EOS, padding.
    pub ids: Vec<u32>,
    /// How many tokens were dropped by truncation (0 if the prompt fit).
    pub truncated_tokens: usize,
}

const CLIP_SPLIT: &str = r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";
const BOS: &str = "<|startoftext|>";
const EOS: &str = "<|endoftext|>";

impl ClipTokenizer {
    /// Build from a diffusers `tokenizer/` folder: `vocab.json` + `merges.txt` (as transformers 4
    /// saved it), or `tokenizer.json` alone (as transformers 5 saves it; the same byte-level BPE),
    /// and optionally `special_tokens_map.json` / `tokenizer_config.json` naming the pad token.
    /// Either way the tokenizer is rebuilt from the vocabulary and merges with CLIP's own
    /// normalisation and splitting, so both layouts give the same ids.
    pub fn from_folder(dir: &Path) -> Result<Self, ClipError> {
        let (vocab_path, vocab, merges) = if dir.join("vocab.json").is_file() || !dir.join("tokenizer.json").is_file() {
            read_vocab_merges(dir)?
        } else {
            read_tokenizer_json(&dir.join("tokenizer.json"))?
        };
        let pad_token = read_pad_token(dir).unwrap_or_else(|| EOS.to_string());
        Self::build(&vocab_path, vocab, merges, &pad_token, dir)
    }

    /// SD 1.x's CLIP tokenizer (OpenAI CLIP's BPE, padding with `<|endoftext|>`), built into the
    /// binary from `models/clip-tokenizer/`: single-file checkpoints do not carry one.
    pub fn sd1() -> Result<Self, ClipError> {
        let here = Path::new("<built-in CLIP tokenizer>");
        let vocab: serde_json::Map<String, serde_json::Value> = serde_json::from_str(SD1_VOCAB).map_err(|e| ClipError::File {
            path: here.to_path_buf(),
            reason: e.to_string(),
        })?;
        let merges = parse_merges(SD1_MERGES, here)?;
        Self::build(here, vocab, merges, EOS, here)
    }

    /// The tokenizer from a vocabulary and BPE merges.
    fn build(
        vocab_path: &Path,
        vocab: serde_json::Map<String, serde_json::Value>,
        merges: Vec<serde_json::Value>,
        pad_token: &str,
        dir: &Path,
    ) -> Result<Self, ClipError> {
        let file_err = |path: &Path, reason: String| ClipError::File {
            path: path.to_path_buf(),
            reason,
        };
        let id_of = |tok: &str| -> Result<u32, ClipError> {
            vocab
                .get(tok)
                .and_then(|v| v.as_u64())
                .map(|v| v as u32)
                .ok_or_else(|| file_err(&vocab_path, format!("the vocabulary has no {tok} token")))
        };
        let bos_id = id_of(BOS)?;
        let eos_id = id_of(EOS)?;
        let pad_id = id_of(pad_token)?;
        let json = serde_json::json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": [
                {"id": bos_id, "content": BOS, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
                {"id": eos_id, "content": EOS, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
            ],
            "normalizer": {"type": "Sequence", "normalizers": [
                {"type": "NFC"},
                {"type": "Replace", "pattern": {"Regex": r"\s+"}, "content": " "},
                {"type": "Lowercase"},
            ]},
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": CLIP_SPLIT}, "behavior": "Removed", "invert": true},
                {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
            ]},
            "post_processor": {"type": "RobertaProcessing", "sep": [EOS, eos_id], "cls": [BOS, bos_id], "trim_offsets": false, "add_prefix_space": false},
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {
                "type": "BPE", "dropout": null, "unk_token": EOS, "continuing_subword_prefix": "",
                "end_of_word_suffix": "</w>", "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                "vocab": vocab, "merges": merges,
            },
        });
        let inner: tokenizers::Tokenizer = json
            .to_string()
            .parse()
            .map_err(|e| file_err(dir, format!("cannot build the BPE tokenizer: {e}")))?;
        Ok(Self {
            inner,
            bos_id,
            eos_id,
            pad_id,
            max_length: 77,
        })
    }

    /// The largest id the tokenizer can produce.
    pub fn max_id(&self) -> u32 {
        self.inner.get_vocab(true).values().copied().max().unwrap_or(0)
    }

    /// Token ids with BOS/EOS and no padding or truncation.
    pub fn encode_unpadded(&self, text: &str) -> Result<Vec<u32>, ClipError> {
        let enc = self.inner.encode(text, true).map_err(|e| ClipError::File {
            path: PathBuf::from("<tokenizer>"),
            reason: e.to_string(),
        })?;
        Ok(enc.get_ids().to_vec())
    }

    /// Ids padded with the pad token and truncated to `max_length` (keeping EOS last), as
    /// diffusers' pipelines call the tokenizer.
    pub fn encode(&self, text: &str) -> Result<Encoded, ClipError> {
        let mut ids = self.encode_unpadded(text)?;
        let max = self.max_length;
        let mut truncated_tokens = 0;
        if ids.len() > max {
            truncated_tokens = ids.len() - max;
            ids.truncate(max - 1);
            ids.push(self.eos_id);
        }
        ids.resize(max, self.pad_id);
        Ok(Encoded {
            ids,
            truncated_tokens,
        })
    }
}

/// `vocab.json` (token -> id) and `merges.txt` (one `a b` pair per line).
fn read_vocab_merges(dir: &Path) -> Result<(PathBuf, serde_json::Map<String, serde_json::Value>, Vec<serde_json::Value>), ClipError> {
    let file_err = |path: &Path, reason: String| ClipError::File {
        path: path.to_path_buf(),
        reason,
    };
    let vocab_path = dir.join("vocab.json");
    let merges_path = dir.join("merges.txt");
    let missing = |path: &Path, e: std::io::Error| {
        if e.kind() == std::io::ErrorKind::NotFound {
            file_err(path, "not found (a CLIP tokenizer folder holds vocab.json + merges.txt, or tokenizer.json)".into())
        } else {
            file_err(path, e.to_string())
        }
    };
    let vocab_text = std::fs::read_to_string(&vocab_path).map_err(|e| missing(&vocab_path, e))?;
    let vocab: serde_json::Map<String, serde_json::Value> = serde_json::from_str(&vocab_text)
        .map_err(|e| file_err(&vocab_path, format!("not a JSON token -> id map: {e}")))?;
    let merges_text = std::fs::read_to_string(&merges_path).map_err(|e| missing(&merges_path, e))?;
    let merges = parse_merges(&merges_text, &merges_path)?;
    Ok((vocab_path, vocab, merges))
}

/// `merges.txt`: one `a b` pair per line after an optional `#version` line.
fn parse_merges(text: &str, path: &Path) -> Result<Vec<serde_json::Value>, ClipError> {
    let mut merges = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.starts_with("#version") || line.trim().is_empty() {
            continue;
        }
        let mut parts = line.split(' ');
        match (parts.next(), parts.next(), parts.next()) {
            (Some(a), Some(b), None) => merges.push(serde_json::json!([a, b])),
            _ => {
                return Err(ClipError::File {
                    path: path.to_path_buf(),
                    reason: format!("line {}: expected two space-separated symbols, got {line:?}", i + 1),
                });
            }
        }
    }
    Ok(merges)
}

const SD1_VOCAB: &str = include_str!("../../models/clip-tokenizer/vocab.json");
const SD1_MERGES: &str = include_str!("../../models/clip-tokenizer/merges.txt");
/// Tokens in SD 1.x's CLIP vocabulary.
pub const SD1_VOCAB_SIZE: usize = 49408;

/// The BPE vocabulary and merges of a `tokenizer.json` (merges as `"a b"` strings or `["a", "b"]`
/// pairs, both of which the tokenizers library writes).
fn read_tokenizer_json(path: &Path) -> Result<(PathBuf, serde_json::Map<String, serde_json::Value>, Vec<serde_json::Value>), ClipError> {
    let file_err = |reason: String| ClipError::File {
        path: path.to_path_buf(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(|e| file_err(e.to_string()))?;
    let mut json: serde_json::Value = serde_json::from_str(&text).map_err(|e| file_err(format!("not JSON: {e}")))?;
    let model = json.get_mut("model").ok_or_else(|| file_err("no `model` section".into()))?;
    if model.get("type").and_then(|t| t.as_str()) != Some("BPE") {
        return Err(file_err(format!(
            "the tokenizer model is {}, not the byte-level BPE of CLIP",
            model.get("type").map(|t| t.to_string()).unwrap_or_else(|| "unnamed".into())
        )));
    }
    let vocab = match model.get_mut("vocab").map(serde_json::Value::take) {
        Some(serde_json::Value::Object(m)) => m,
        _ => return Err(file_err("`model.vocab` is not a token -> id map".into())),
    };
    let raw = match model.get_mut("merges").map(serde_json::Value::take) {
        Some(serde_json::Value::Array(a)) => a,
        _ => return Err(file_err("`model.merges` is not a list".into())),
    };
    let mut merges = Vec::with_capacity(raw.len());
    for (i, m) in raw.into_iter().enumerate() {
        let pair = match &m {
            serde_json::Value::String(s) => s.split_once(' ').map(|(a, b)| serde_json::json!([a, b])),
            serde_json::Value::Array(a) if a.len() == 2 && a.iter().all(|x| x.is_string()) => Some(m.clone()),
            _ => None,
        };
        merges.push(pair.ok_or_else(|| file_err(format!("merge {i}: expected \"a b\" or [a, b], got {m}")))?);
    }
    Ok((path.to_path_buf(), vocab, merges))
}

fn read_pad_token(dir: &Path) -> Option<String> {
    for name in ["special_tokens_map.json", "tokenizer_config.json"] {
        let Ok(text) = std::fs::read_to_string(dir.join(name)) else {
            continue;
        };
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else {
            continue;
        };
        match &v["pad_token"] {
            serde_json::Value::String(s) => return Some(s.clone()),
            serde_json::Value::Object(o) => {
                if let Some(s) = o.get("content").and_then(|c| c.as_str()) {
                    return Some(s.to_string());
                }
            }
            _ => {}
        }
    }
    None
}

// ---------------------------------------------------------------------------------------------
// Text transformer
// ---------------------------------------------------------------------------------------------

/// `text_encoder/config.json` (transformers `CLIPTextConfig`).
#[derive(Clone, Debug, Deserialize)]
pub struct ClipTextConfig {
    /// Vocabulary size (49408 for SD 1.5).
    pub vocab_size: usize,
    /// Width (768).
    pub hidden_size: usize,
    /// MLP width (3072).
    pub intermediate_size: usize,
    /// Layers (12).
    pub num_hidden_layers: usize,
    /// Heads (12).
    pub num_attention_heads: usize,
    /// Positions (77).
    pub max_position_embeddings: usize,
    /// `quick_gelu` (SD 1.5) or `gelu`.
    #[serde(default = "quick_gelu")]
    pub hidden_act: String,
    #[serde(default = "ln_eps")]
    pub layer_norm_eps: f64,
}

fn quick_gelu() -> String {
    "quick_gelu".into()
}
fn ln_eps() -> f64 {
    1e-5
}

impl ClipTextConfig {
    pub fn from_file(path: &Path) -> Result<Self, ClipError> {
        let text = std::fs::read_to_string(path).map_err(|e| ClipError::File {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        serde_json::from_str(&text).map_err(|e| ClipError::File {
            path: path.to_path_buf(),
            reason: format!("not a CLIP text config: {e}"),
        })
    }

    /// A config given as JSON (inferred from a single-file checkpoint); `label` names it.
    pub fn from_value(value: serde_json::Value, label: &Path) -> Result<Self, ClipError> {
        serde_json::from_value(value).map_err(|e| ClipError::File {
            path: label.to_path_buf(),
            reason: format!("not a CLIP text config: {e}"),
        })
    }

    pub fn init<B: Backend>(&self, device: &B::Device) -> ClipTextModel<B> {
        let d = self.hidden_size;
        let ln = || LayerNormConfig::new(d).with_epsilon(self.layer_norm_eps).init(device);
        let lin = |i, o| LinearConfig::new(i, o).init(device);
        let quick = self.hidden_act != "gelu";
        ClipTextModel {
            embeddings: ClipEmbeddings {
                token_embedding: EmbeddingConfig::new(self.vocab_size, d).init(device),
                position_embedding: EmbeddingConfig::new(self.max_position_embeddings, d).init(device),
            },
            encoder: ClipEncoder {
                layers: (0..self.num_hidden_layers)
                    .map(|_| ClipEncoderLayer {
                        self_attn: ClipAttention {
                            q_proj: lin(d, d),
                            k_proj: lin(d, d),
                            v_proj: lin(d, d),
                            out_proj: lin(d, d),
                            heads: self.num_attention_heads,
                        },
                        layer_norm1: ln(),
                        mlp: ClipMlp {
                            fc1: lin(d, self.intermediate_size),
                            fc2: lin(self.intermediate_size, d),
                            quick_gelu: quick,
                        },
                        layer_norm2: ln(),
                    })
                    .collect(),
            },
            final_layer_norm: ln(),
        }
    }
}

#[derive(Module, Debug)]
pub struct ClipEmbeddings<B: Backend> {
    pub token_embedding: Embedding<B>,
    pub position_embedding: Embedding<B>,
}

#[derive(Module, Debug)]
pub struct ClipAttention<B: Backend> {
    pub q_proj: Linear<B>,
    pub k_proj: Linear<B>,
    pub v_proj: Linear<B>,
    pub out_proj: Linear<B>,
    pub heads: usize,
}

#[derive(Module, Debug)]
pub struct ClipMlp<B: Backend> {
    pub fc1: Linear<B>,
    pub fc2: Linear<B>,
    pub quick_gelu: bool,
}

#[derive(Module, Debug)]
pub struct ClipEncoderLayer<B: Backend> {
    pub self_attn: ClipAttention<B>,
    pub layer_norm1: LayerNorm<B>,
    pub mlp: ClipMlp<B>,
    pub layer_norm2: LayerNorm<B>,
}

#[derive(Module, Debug)]
pub struct ClipEncoder<B: Backend> {
    pub layers: Vec<ClipEncoderLayer<B>>,
}

/// transformers `CLIPTextModel` (its `text_model`), returning the last hidden state.
#[derive(Module, Debug)]
pub struct ClipTextModel<B: Backend> {
    pub embeddings: ClipEmbeddings<B>,
    pub encoder: ClipEncoder<B>,
    pub final_layer_norm: LayerNorm<B>,
}

impl<B: Backend> ClipAttention<B> {
    fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let q = split_heads(self.q_proj.forward(x.clone()), self.heads);
        let k = split_heads(self.k_proj.forward(x.clone()), self.heads);
        let v = split_heads(self.v_proj.forward(x), self.heads);
        self.out_proj.forward(merge_heads(sdpa(q, k, v, true)))
    }
}

impl<B: Backend> ClipMlp<B> {
    fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let h = self.fc1.forward(x);
        let h = if self.quick_gelu {
            h.clone() * sigmoid(h.mul_scalar(1.702))
        } else {
            gelu(h)
        };
        self.fc2.forward(h)
    }
}

impl<B: Backend> ClipTextModel<B> {
    /// `ids`: [B, S] token ids -> last hidden state [B, S, hidden].
    pub fn forward(&self, ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        let [b, s] = ids.dims();
        let device = ids.device();
        // 1. token + position embeddings
        let positions = Tensor::<B, 1, Int>::arange(0..s as i64, &device)
            .reshape([1, s])
            .expand([b, s]);
        let mut h = self.embeddings.token_embedding.forward(ids)
            + self.embeddings.position_embedding.forward(positions);
        // 2. pre-norm transformer layers with a causal mask
        for layer in &self.encoder.layers {
            h = h.clone() + layer.self_attn.forward(layer.layer_norm1.forward(h));
            h = h.clone() + layer.mlp.forward(layer.layer_norm2.forward(h));
        }
        // 3. final layer norm
        self.final_layer_norm.forward(h)
    }

    /// Encode already-tokenised prompts.
    pub fn encode_ids(&self, ids: &[Vec<u32>], device: &B::Device) -> Tensor<B, 3> {
        let s = ids.first().map(Vec::len).unwrap_or(0);
        let flat: Vec<i64> = ids.iter().flat_map(|v| v.iter().map(|&i| i as i64)).collect();
        let t = Tensor::<B, 2, Int>::from_data(TensorData::new(flat, [ids.len(), s]), device);
        self.forward(t)
    }
}

/// The key remapping for CLIP text checkpoints: strip `text_model.`.
pub fn clip_remap() -> KeyRemap {
    KeyRemap::new()
        .rule(r"^text_model\.", "")
        .unwrap_or_default()
}

/// Load `text_encoder/` (config.json + model[.fp16].safetensors).
pub fn load_text_encoder<B: Backend>(
    dir: &Path,
    dtype: burn::tensor::DType,
    device: &B::Device,
) -> Result<(ClipTextModel<B>, LoadReport), ClipError> {
    let config = ClipTextConfig::from_file(&dir.join("config.json"))?;
    let file = super::manifest::find_weights(dir, &["model.safetensors", "model.fp16.safetensors"])
        .ok_or_else(|| ClipError::File {
            path: dir.join("model.safetensors"),
            reason: "missing (neither model.safetensors nor model.fp16.safetensors exists)".into(),
        })?;
    let weights = Weights::open(&[file])?;
    let model = config.init::<B>(device);
    Ok(load_module(model, &weights, &clip_remap(), dtype, Unused::Allow)?)
}
