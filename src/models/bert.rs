//! RFNet's caption encoder: a BERT text transformer (bert-base-chinese and checkpoints in its
//! layout) and its WordPiece tokenizer built from the folder's own `vocab.txt`.
//!
//! | ours            | reference                                                           |
//! |-----------------|---------------------------------------------------------------------|
//! | `BertTokenizer` | transformers `BertTokenizer` (tokenizers backend: BertNormalizer, BertPreTokenizer, WordPiece, `[CLS] $A [SEP]`) |
//! | `BertModel`     | transformers `BertModel` (`last_hidden_state`, `pooler_output`)     |
//!
//! Checkpoint key -> module path (`bert_remap`):
//!
//! | checkpoint                                   | ours                                        |
//! |----------------------------------------------|---------------------------------------------|
//! | `bert.<key>` (BertForPreTraining / MaskedLM) | `<key>`                                      |
//! | `*.attention.self.*`                         | `*.attention.self_attn.*` (`self` is a Rust keyword) |
//! | `*.LayerNorm.weight` / `*.LayerNorm.bias`     | `*.layer_norm.weight` / `*.layer_norm.bias`  |
//! | `*.LayerNorm.gamma` / `*.LayerNorm.beta` (TF-era files) | `*.layer_norm.weight` / `*.layer_norm.bias` |
//!
//! Tensors allowed to stay unused: the pre-training heads `cls.*` and `*position_ids` buffers.
//! RoBERTa-wwm checkpoints (hfl/chinese-roberta-wwm-ext) use these BERT keys and load as they are.

use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::nn::{Embedding, EmbeddingConfig, LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::tensor::activation::{gelu, relu, tanh};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Int, Tensor, TensorData};
use serde::Deserialize;

use super::diffusers_blocks::{merge_heads, split_heads};
use super::weights::{KeyRemap, LoadReport, Unused, WeightError, Weights, load_module};

#[derive(Debug, thiserror::Error)]
pub enum BertError {
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("tokenizing {text:?} failed: {reason}")]
    Encode { text: String, reason: String },
    #[error("max_length {0} leaves no room for [CLS] and [SEP] (at least 2)")]
    MaxLength(usize),
    #[error(transparent)]
    Weights(#[from] WeightError),
}

// ---------------------------------------------------------------------------------------------
// Tokenizer
// ---------------------------------------------------------------------------------------------

const PAD: &str = "[PAD]";
const UNK: &str = "[UNK]";
const CLS: &str = "[CLS]";
const SEP: &str = "[SEP]";
const MASK: &str = "[MASK]";

/// The BERT WordPiece tokenizer, as transformers' `BertTokenizer` builds it from `vocab.txt`.
#[derive(Clone)]
pub struct BertTokenizer {
    inner: tokenizers::Tokenizer,
    pub pad_id: u32,
    pub unk_id: u32,
    pub cls_id: u32,
    pub sep_id: u32,
    /// Number of lines (ids) of `vocab.txt`.
    pub vocab_size: usize,
}

/// One encoded caption, padded to `max_length`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BertEncoding {
    /// `[CLS]`, tokens, `[SEP]`, then `[PAD]` up to `max_length`.
    pub ids: Vec<u32>,
    /// 1 for real tokens (`[CLS]` and `[SEP]` included), 0 for padding.
    pub attention_mask: Vec<u32>,
    /// How many tokens truncation dropped (0 if the text fit).
    pub truncated_tokens: usize,
}

/// The switches of `tokenizer_config.json` that change tokenisation.
#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
struct TokenizerSwitches {
    /// Lower-case the text (and strip accents unless `strip_accents` says otherwise).
    do_lower_case: bool,
    /// Put spaces around CJK ideographs so each is a word.
    tokenize_chinese_chars: bool,
    /// Strip accents; `None` follows `do_lower_case`.
    strip_accents: Option<bool>,
}

impl Default for TokenizerSwitches {
    fn default() -> Self {
        Self {
            do_lower_case: true,
            tokenize_chinese_chars: true,
            strip_accents: None,
        }
    }
}

/// `vocab.txt` as transformers reads it: one token per '\n'-terminated line (a trailing '\r'
/// stripped), the id is the line index. Other line separators (U+2028 is a token of the Chinese
/// vocabulary) are token characters, so `str::lines` is not used.
pub fn read_vocab(path: &Path) -> Result<Vec<String>, BertError> {
    let file_err = |reason: String| BertError::File {
        path: path.to_path_buf(),
        reason,
    };
    let bytes = std::fs::read(path).map_err(|e| file_err(e.to_string()))?;
    let text = String::from_utf8(bytes).map_err(|e| file_err(format!("not UTF-8: {e}")))?;
    let mut tokens: Vec<String> = text
        .split('\n')
        .map(|line| line.strip_suffix('\r').unwrap_or(line).to_string())
        .collect();
    if tokens.last().is_some_and(|t| t.is_empty()) {
        tokens.pop();
    }
    if tokens.is_empty() {
        return Err(file_err("the vocabulary is empty".into()));
    }
    Ok(tokens)
}

impl BertTokenizer {
    /// Build from a folder holding `vocab.txt` and optionally `tokenizer_config.json`
    /// (`do_lower_case`, `tokenize_chinese_chars`, `strip_accents`).
    pub fn from_folder(dir: &Path) -> Result<Self, BertError> {
        let vocab_path = dir.join("vocab.txt");
        let tokens = read_vocab(&vocab_path)?;
        let switches = read_switches(dir)?;
        // 1. token -> id (a repeated token keeps its last line, as a Python dict would)
        let mut vocab = serde_json::Map::new();
        for (id, token) in tokens.iter().enumerate() {
            vocab.insert(token.clone(), serde_json::json!(id));
        }
        let id_of = |tok: &str| -> Option<u32> { vocab.get(tok).and_then(|v| v.as_u64()).map(|v| v as u32) };
        let required = |tok: &str| {
            id_of(tok).ok_or_else(|| BertError::File {
                path: vocab_path.clone(),
                reason: format!("the vocabulary has no {tok} token"),
            })
        };
        let (pad_id, unk_id, cls_id, sep_id) =
            (required(PAD)?, required(UNK)?, required(CLS)?, required(SEP)?);
        // 2. special tokens, matched in the raw text before normalisation
        let added_tokens: Vec<serde_json::Value> = [PAD, UNK, CLS, SEP, MASK]
            .iter()
            .filter_map(|tok| id_of(tok).map(|id| (tok, id)))
            .map(|(tok, id)| {
                serde_json::json!({"id": id, "content": tok, "single_word": false, "lstrip": false,
                    "rstrip": false, "normalized": false, "special": true})
            })
            .collect();
        // 3. the pipeline transformers' BertTokenizer builds
        let json = serde_json::json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added_tokens,
            "normalizer": {
                "type": "BertNormalizer",
                "clean_text": true,
                "handle_chinese_chars": switches.tokenize_chinese_chars,
                "strip_accents": switches.strip_accents,
                "lowercase": switches.do_lower_case,
            },
            "pre_tokenizer": {"type": "BertPreTokenizer"},
            "post_processor": {"type": "BertProcessing", "sep": [SEP, sep_id], "cls": [CLS, cls_id]},
            "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": true},
            "model": {
                "type": "WordPiece", "unk_token": UNK, "continuing_subword_prefix": "##",
                "max_input_chars_per_word": 100, "vocab": vocab,
            },
        });
        let inner: tokenizers::Tokenizer = json.to_string().parse().map_err(|e| BertError::File {
            path: vocab_path.clone(),
            reason: format!("cannot build the WordPiece tokenizer: {e}"),
        })?;
        Ok(Self {
            inner,
            pad_id,
            unk_id,
            cls_id,
            sep_id,
            vocab_size: tokens.len(),
        })
    }

    /// Ids with `[CLS]`/`[SEP]`, no truncation or padding.
    pub fn encode_unpadded(&self, text: &str) -> Result<Vec<u32>, BertError> {
        let enc = self.inner.encode(text, true).map_err(|e| BertError::Encode {
            text: text.to_string(),
            reason: e.to_string(),
        })?;
        Ok(enc.get_ids().to_vec())
    }

    /// Ids truncated to `max_length` (keeping `[SEP]` last) and padded with `[PAD]`, as
    /// `tokenizer(text, max_length=.., truncation=True, padding="max_length")`.
    pub fn encode(&self, text: &str, max_length: usize) -> Result<BertEncoding, BertError> {
        if max_length < 2 {
            return Err(BertError::MaxLength(max_length));
        }
        let mut ids = self.encode_unpadded(text)?;
        let mut truncated_tokens = 0;
        if ids.len() > max_length {
            truncated_tokens = ids.len() - max_length;
            ids.truncate(max_length - 1);
            ids.push(self.sep_id);
        }
        let real = ids.len();
        ids.resize(max_length, self.pad_id);
        let attention_mask = (0..max_length).map(|i| u32::from(i < real)).collect();
        Ok(BertEncoding {
            ids,
            attention_mask,
            truncated_tokens,
        })
    }

    /// Encode a batch and stack it into `(input_ids, attention_mask)` tensors [N, max_length].
    pub fn encode_batch<B: Backend>(
        &self,
        texts: &[&str],
        max_length: usize,
        device: &B::Device,
    ) -> Result<(Tensor<B, 2, Int>, Tensor<B, 2, Int>), BertError> {
        let encodings = texts
            .iter()
            .map(|t| self.encode(t, max_length))
            .collect::<Result<Vec<_>, _>>()?;
        let stack = |f: fn(&BertEncoding) -> &[u32]| {
            let flat: Vec<i64> = encodings
                .iter()
                .flat_map(|e| f(e).iter().map(|&v| i64::from(v)))
                .collect();
            Tensor::<B, 2, Int>::from_data(TensorData::new(flat, [texts.len(), max_length]), device)
        };
        Ok((stack(|e| &e.ids), stack(|e| &e.attention_mask)))
    }
}

fn read_switches(dir: &Path) -> Result<TokenizerSwitches, BertError> {
    let path = dir.join("tokenizer_config.json");
    if !path.is_file() {
        return Ok(TokenizerSwitches::default());
    }
    let file_err = |reason: String| BertError::File {
        path: path.clone(),
        reason,
    };
    let text = std::fs::read_to_string(&path).map_err(|e| file_err(e.to_string()))?;
    serde_json::from_str(&text).map_err(|e| file_err(format!("not a tokenizer config: {e}")))
}

// ---------------------------------------------------------------------------------------------
// Config
// ---------------------------------------------------------------------------------------------

/// The feed-forward activation (`hidden_act`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub enum HiddenAct {
    /// Exact (erf) GELU.
    #[serde(rename = "gelu")]
    Gelu,
    /// The tanh approximation of GELU.
    #[serde(rename = "gelu_new", alias = "gelu_pytorch_tanh", alias = "gelu_fast")]
    GeluTanh,
    #[serde(rename = "relu")]
    Relu,
}

impl HiddenAct {
    fn apply<B: Backend>(self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        match self {
            HiddenAct::Gelu => gelu(x),
            HiddenAct::GeluTanh => {
                // 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
                let inner = (x.clone() + x.clone().powi_scalar(3).mul_scalar(0.044715))
                    .mul_scalar((2.0 / std::f64::consts::PI).sqrt());
                x.mul_scalar(0.5) * (tanh(inner) + 1.0)
            }
            HiddenAct::Relu => relu(x),
        }
    }
}

/// `config.json` (transformers `BertConfig`).
#[derive(Clone, Debug, Deserialize)]
pub struct BertConfig {
    /// Vocabulary size (21128 for bert-base-chinese).
    pub vocab_size: usize,
    /// Width (768).
    pub hidden_size: usize,
    /// Layers (12).
    pub num_hidden_layers: usize,
    /// Heads (12).
    pub num_attention_heads: usize,
    /// Feed-forward width (3072).
    pub intermediate_size: usize,
    /// Positions (512).
    pub max_position_embeddings: usize,
    /// Segment types (2).
    #[serde(default = "two")]
    pub type_vocab_size: usize,
    /// LayerNorm epsilon (1e-12).
    #[serde(default = "bert_eps")]
    pub layer_norm_eps: f64,
    /// Feed-forward activation (`gelu`).
    #[serde(default = "default_act")]
    pub hidden_act: HiddenAct,
    /// Only `absolute` position embeddings are built.
    #[serde(default = "absolute")]
    pub position_embedding_type: String,
}

fn two() -> usize {
    2
}
fn bert_eps() -> f64 {
    1e-12
}
fn default_act() -> HiddenAct {
    HiddenAct::Gelu
}
fn absolute() -> String {
    "absolute".into()
}

impl BertConfig {
    pub fn from_file(path: &Path) -> Result<Self, BertError> {
        let file_err = |reason: String| BertError::File {
            path: path.to_path_buf(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| file_err(e.to_string()))?;
        let config: Self =
            serde_json::from_str(&text).map_err(|e| file_err(format!("not a BERT config: {e}")))?;
        if config.position_embedding_type != "absolute" {
            return Err(file_err(format!(
                "position_embedding_type {:?} is not supported (only \"absolute\")",
                config.position_embedding_type
            )));
        }
        if config.num_attention_heads == 0 || config.hidden_size % config.num_attention_heads != 0 {
            return Err(file_err(format!(
                "hidden_size {} is not divisible by num_attention_heads {}",
                config.hidden_size, config.num_attention_heads
            )));
        }
        Ok(config)
    }

    /// A `BertModel` with its pooler (transformers' default).
    pub fn init<B: Backend>(&self, device: &B::Device) -> BertModel<B> {
        self.init_with_pooler(true, device)
    }

    /// `pooler` false: no pooler, as transformers' `BertModel(add_pooling_layer=False)` and the
    /// encoder inside `BertForMaskedLM`; `pooler_output` is then `None`.
    pub fn init_with_pooler<B: Backend>(&self, pooler: bool, device: &B::Device) -> BertModel<B> {
        let d = self.hidden_size;
        let ln = || {
            LayerNormConfig::new(d)
                .with_epsilon(self.layer_norm_eps)
                .init(device)
        };
        let lin = |i, o| LinearConfig::new(i, o).init(device);
        let emb = |n| EmbeddingConfig::new(n, d).init(device);
        BertModel {
            embeddings: BertEmbeddings {
                word_embeddings: emb(self.vocab_size),
                position_embeddings: emb(self.max_position_embeddings),
                token_type_embeddings: emb(self.type_vocab_size),
                layer_norm: ln(),
            },
            encoder: BertEncoder {
                layer: (0..self.num_hidden_layers)
                    .map(|_| BertLayer {
                        attention: BertAttention {
                            self_attn: BertSelfAttention {
                                query: lin(d, d),
                                key: lin(d, d),
                                value: lin(d, d),
                                heads: self.num_attention_heads,
                            },
                            output: BertSelfOutput {
                                dense: lin(d, d),
                                layer_norm: ln(),
                            },
                        },
                        intermediate: BertIntermediate {
                            dense: lin(d, self.intermediate_size),
                            act: self.hidden_act,
                        },
                        output: BertOutput {
                            dense: lin(self.intermediate_size, d),
                            layer_norm: ln(),
                        },
                    })
                    .collect(),
            },
            pooler: pooler.then(|| BertPooler { dense: lin(d, d) }),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Modules (field names are the checkpoint's, but `layer_norm` for `LayerNorm`)
// ---------------------------------------------------------------------------------------------

#[derive(Module, Debug)]
pub struct BertEmbeddings<B: Backend> {
    pub word_embeddings: Embedding<B>,
    pub position_embeddings: Embedding<B>,
    pub token_type_embeddings: Embedding<B>,
    pub layer_norm: LayerNorm<B>,
}

/// `attention.self`.
#[derive(Module, Debug)]
pub struct BertSelfAttention<B: Backend> {
    pub query: Linear<B>,
    pub key: Linear<B>,
    pub value: Linear<B>,
    pub heads: usize,
}

/// `attention.output`.
#[derive(Module, Debug)]
pub struct BertSelfOutput<B: Backend> {
    pub dense: Linear<B>,
    pub layer_norm: LayerNorm<B>,
}

#[derive(Module, Debug)]
pub struct BertAttention<B: Backend> {
    /// `self` in the checkpoint.
    pub self_attn: BertSelfAttention<B>,
    pub output: BertSelfOutput<B>,
}

#[derive(Module, Debug)]
pub struct BertIntermediate<B: Backend> {
    pub dense: Linear<B>,
    pub act: HiddenAct,
}

/// The layer's feed-forward `output`.
#[derive(Module, Debug)]
pub struct BertOutput<B: Backend> {
    pub dense: Linear<B>,
    pub layer_norm: LayerNorm<B>,
}

#[derive(Module, Debug)]
pub struct BertLayer<B: Backend> {
    pub attention: BertAttention<B>,
    pub intermediate: BertIntermediate<B>,
    pub output: BertOutput<B>,
}

#[derive(Module, Debug)]
pub struct BertEncoder<B: Backend> {
    pub layer: Vec<BertLayer<B>>,
}

#[derive(Module, Debug)]
pub struct BertPooler<B: Backend> {
    pub dense: Linear<B>,
}

/// transformers `BertModel`.
#[derive(Module, Debug)]
pub struct BertModel<B: Backend> {
    pub embeddings: BertEmbeddings<B>,
    pub encoder: BertEncoder<B>,
    /// Absent in checkpoints saved without one (`BertForMaskedLM`); RFNet uses only the last
    /// hidden state.
    pub pooler: Option<BertPooler<B>>,
}

/// What `BertModel::forward` returns.
#[derive(Clone, Debug)]
pub struct BertModelOutput<B: Backend> {
    /// [B, S, hidden], every position (padded ones included).
    pub last_hidden_state: Tensor<B, 3>,
    /// tanh(dense(first token)) [B, hidden]; `None` without a pooler.
    pub pooler_output: Option<Tensor<B, 2>>,
}

impl<B: Backend> BertSelfAttention<B> {
    /// `padding`: [B, heads, S, S], true where the key is padding.
    fn forward(&self, x: Tensor<B, 3>, padding: Tensor<B, 4, burn::tensor::Bool>) -> Tensor<B, 3> {
        let q = split_heads(self.query.forward(x.clone()), self.heads);
        let k = split_heads(self.key.forward(x.clone()), self.heads);
        let v = split_heads(self.value.forward(x), self.heads);
        let out = burn::tensor::module::attention(
            q,
            k,
            v,
            Some(padding),
            None,
            burn::tensor::ops::AttentionModuleOptions {
                scale: None,
                softcap: None,
                is_causal: false,
            },
        );
        merge_heads(out)
    }
}

impl<B: Backend> BertLayer<B> {
    fn forward(&self, h: Tensor<B, 3>, padding: Tensor<B, 4, burn::tensor::Bool>) -> Tensor<B, 3> {
        // 1. self-attention, post-norm residual
        let a = self.attention.self_attn.forward(h.clone(), padding);
        let out = &self.attention.output;
        let h = out.layer_norm.forward(out.dense.forward(a) + h);
        // 2. feed-forward, post-norm residual
        let i = self
            .intermediate
            .act
            .apply(self.intermediate.dense.forward(h.clone()));
        self.output.layer_norm.forward(self.output.dense.forward(i) + h)
    }
}

impl<B: Backend> BertModel<B> {
    /// `input_ids`, `attention_mask` (1 = token, 0 = padding): [B, S]; `token_type_ids`
    /// defaults to all zeros. Padded positions are computed like transformers does: their
    /// queries attend to the real tokens, only padded keys are masked.
    pub fn forward(
        &self,
        input_ids: Tensor<B, 2, Int>,
        attention_mask: Tensor<B, 2, Int>,
        token_type_ids: Option<Tensor<B, 2, Int>>,
    ) -> BertModelOutput<B> {
        let [b, s] = input_ids.dims();
        let device = input_ids.device();
        let heads = self
            .encoder
            .layer
            .first()
            .map(|l| l.attention.self_attn.heads)
            .unwrap_or(1);
        // 1. word + position + token-type embeddings, LayerNorm
        let positions = Tensor::<B, 1, Int>::arange(0..s as i64, &device)
            .reshape([1, s])
            .expand([b, s]);
        let token_types = token_type_ids.unwrap_or_else(|| Tensor::zeros([b, s], &device));
        let e = &self.embeddings;
        let mut h = e.layer_norm.forward(
            e.word_embeddings.forward(input_ids)
                + e.position_embeddings.forward(positions)
                + e.token_type_embeddings.forward(token_types),
        );
        // 2. key-padding mask, broadcast to every head and query
        let padding = attention_mask
            .equal_elem(0)
            .reshape([b, 1, 1, s])
            .expand([b, heads, s, s]);
        // 3. post-norm transformer layers
        for layer in &self.encoder.layer {
            h = layer.forward(h, padding.clone());
        }
        // 4. pooler on the first ([CLS]) token
        let [_, _, d] = h.dims();
        let first = h.clone().slice([0..b, 0..1, 0..d]).reshape([b, d]);
        let pooler_output = self.pooler.as_ref().map(|p| tanh(p.dense.forward(first)));
        BertModelOutput {
            last_hidden_state: h,
            pooler_output,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Loading
// ---------------------------------------------------------------------------------------------

/// Checkpoint keys -> module paths (table in the module docs). Rules are tried in order and the
/// first match wins, so each rule also strips an optional `bert.` prefix.
pub fn bert_remap() -> KeyRemap {
    let rules = [
        // `self` is a Rust keyword
        (
            r"^(?:bert\.)?(.*)\.attention\.self\.(.*)$",
            "${1}.attention.self_attn.${2}",
        ),
        // `LayerNorm` (not snake case), with the TF-era `gamma` / `beta` parameter names
        (
            r"^(?:bert\.)?(.*)\.LayerNorm\.(?:weight|gamma)$",
            "${1}.layer_norm.weight",
        ),
        (
            r"^(?:bert\.)?(.*)\.LayerNorm\.(?:bias|beta)$",
            "${1}.layer_norm.bias",
        ),
        // BertForPreTraining / BertForMaskedLM wrap the encoder in `bert.`
        (r"^bert\.", ""),
    ];
    rules
        .iter()
        .try_fold(KeyRemap::new(), |remap, (pattern, replacement)| {
            remap.rule(pattern, replacement)
        })
        .unwrap_or_default()
}

/// Whether an unused checkpoint tensor is one BERT files legitimately carry.
fn ignorable(key: &str) -> bool {
    key.starts_with("cls.") || key.ends_with("position_ids")
}

/// Load a BERT folder: `config.json` + `model.safetensors` (or `model.fp16.safetensors`).
pub fn load_bert<B: Backend>(
    dir: &Path,
    dtype: DType,
    device: &B::Device,
) -> Result<(BertModel<B>, LoadReport), BertError> {
    let config = BertConfig::from_file(&dir.join("config.json"))?;
    let file = super::manifest::find_weights(dir, &["model.safetensors", "model.fp16.safetensors"])
        .ok_or_else(|| BertError::File {
            path: dir.join("model.safetensors"),
            reason: "missing (neither model.safetensors nor model.fp16.safetensors exists)".into(),
        })?;
    let weights = Weights::open(&[file])?;
    // A checkpoint without pooler weights (a `BertForMaskedLM` file, or `BertModel` saved with
    // `add_pooling_layer=False`) loads without one: the caption encoder never uses it.
    let has_pooler = ["pooler.dense.weight", "bert.pooler.dense.weight"].iter().any(|k| weights.contains(k));
    let model = config.init_with_pooler::<B>(has_pooler, device);
    let (model, report) = load_module(model, &weights, &bert_remap(), dtype, Unused::Allow)?;
    let unexpected: Vec<String> = report.unused.iter().filter(|k| !ignorable(k)).cloned().collect();
    if !unexpected.is_empty() {
        return Err(WeightError::Unused {
            files: weights.file_list(),
            unused: unexpected,
        }
        .into());
    }
    Ok((model, report))
}
