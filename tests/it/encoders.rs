//! RFNet's encoders against torchvision 0.29 / transformers 5.24 at tiny configs: ResNet-50
//! (image) and BERT + its WordPiece tokenizer (captions). Fixtures from make_fixtures.py.

use std::path::{Path, PathBuf};

use burn::tensor::{DType, Int, Tensor, TensorData};
use rfstudio::models::bert::{BertTokenizer, load_bert, read_vocab};
use rfstudio::models::resnet::{ResNet, load_resnet};
use rfstudio::models::weights::read_ints;

use crate::common::*;

fn tiny(p: &str) -> PathBuf {
    root().join("models").join("tiny").join(p)
}

#[test]
fn parity_resnet_features_and_logits() {
    let dev = device();
    let io_set = open(&[&fixture("resnet50.io.safetensors")]);
    let (model, report) = load_resnet::<B>(&tiny("resnet50"), DType::F32, &dev).expect("load");
    assert!(
        report.unused.iter().all(|k| k.ends_with("num_batches_tracked")) && !report.unused.is_empty(),
        "{:?}",
        report.unused
    );
    let image = io::<4>(&io_set, "image");
    // 1. stem and the stages one by one
    let mut h = model.stem(image.clone());
    assert_close("resnet stem", h.clone(), io(&io_set, "dbg.stem"), 1e-4);
    for (i, stage) in model.stages().into_iter().enumerate() {
        h = ResNet::forward_stage(stage, h);
        let key = if i < 3 {
            format!("dbg.layer{}", i + 1)
        } else {
            "features".to_string()
        };
        assert_close(&format!("resnet {key}"), h.clone(), io(&io_set, &key), 1e-4);
    }
    // 2. the public entry points
    let features = model.forward_features(image.clone());
    assert_eq!(features.dims(), [2, 256, 2, 2]);
    assert_close("resnet features", features.clone(), io(&io_set, "features"), 1e-4);
    assert_close(
        "resnet pooled",
        ResNet::pool(features),
        io(&io_set, "pooled"),
        1e-4,
    );
    assert_close("resnet logits", model.forward(image), io(&io_set, "logits"), 1e-4);
}

#[derive(serde::Deserialize)]
struct BertCase {
    text: String,
    ids: Vec<u32>,
    attention_mask: Vec<u32>,
    ids_untruncated: Vec<u32>,
}

#[test]
fn parity_tokenizer_bert_chinese_english_mixed() {
    let tok = BertTokenizer::from_folder(&tiny("bert-chinese")).expect("tokenizer");
    assert_eq!(tok.vocab_size, 21128);
    assert_eq!(
        (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id),
        (0, 100, 101, 102)
    );
    let text = std::fs::read_to_string(fixture("bert_tokenizer_cases.json")).expect("cases");
    let cases: Vec<BertCase> = serde_json::from_str(&text).expect("json");
    assert_eq!(cases.len(), 32);
    let mut failures = Vec::new();
    let mut truncated = 0;
    for case in &cases {
        let raw = tok.encode_unpadded(&case.text).expect("encode");
        let enc = tok.encode(&case.text, 32).expect("encode");
        if raw != case.ids_untruncated || enc.ids != case.ids || enc.attention_mask != case.attention_mask {
            failures.push(format!(
                "{:?}\n  ours {:?}\n  ref  {:?}\n  mask ours {:?} ref {:?}",
                case.text, raw, case.ids_untruncated, enc.attention_mask, case.attention_mask
            ));
        }
        assert_eq!(enc.truncated_tokens, raw.len().saturating_sub(32));
        truncated += usize::from(enc.truncated_tokens > 0);
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases differ:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
    assert!(truncated >= 1, "no case longer than 32 tokens");
    assert!(tok.encode("x", 1).is_err());
}

fn bert_inputs(io_set: &rfstudio::models::weights::Weights, key: &str) -> Tensor<B, 2, Int> {
    let (v, shape) = read_ints(io_set, key).expect(key);
    Tensor::from_data(TensorData::new(v, shape), &device())
}

/// Run the BERT in `model_dir` on the fixture's inputs, check it against transformers and
/// return (last_hidden_state, pooler_output).
fn assert_bert_matches(model_dir: &Path, label: &str) -> (Tensor<B, 3>, Tensor<B, 2>) {
    let dev = device();
    let io_set = open(&[&fixture("bert.io.safetensors")]);
    let (model, _) = load_bert::<B>(model_dir, DType::F32, &dev).expect("load");
    let out = model.forward(
        bert_inputs(&io_set, "input_ids"),
        bert_inputs(&io_set, "attention_mask"),
        Some(bert_inputs(&io_set, "token_type_ids")),
    );
    assert_close(
        &format!("{label} last_hidden_state"),
        out.last_hidden_state.clone(),
        io(&io_set, "last_hidden_state"),
        1e-4,
    );
    let pooled = out.pooler_output.expect("the tiny BERT has a pooler");
    assert_close(&format!("{label} pooler_output"), pooled.clone(), io(&io_set, "pooler_output"), 1e-4);
    (out.last_hidden_state, pooled)
}

#[test]
fn parity_bert_last_hidden_state_and_pooler() {
    let dev = device();
    assert_bert_matches(&tiny("bert-chinese"), "bert");
    // Our tokenizer gives transformers' ids and mask for the two titles (in the metadata).
    let io_set = open(&[&fixture("bert.io.safetensors")]);
    let titles: Vec<String> =
        serde_json::from_str(&io_set.files()[0].metadata()["titles"]).expect("titles metadata");
    let refs: Vec<&str> = titles.iter().map(String::as_str).collect();
    let tok = BertTokenizer::from_folder(&tiny("bert-chinese")).expect("tokenizer");
    let (ids, mask) = tok.encode_batch::<B>(&refs, 32, &dev).expect("encode");
    let as_i64 = |t: Tensor<B, 2, Int>| t.into_data().convert::<i64>().to_vec::<i64>().expect("i64");
    assert_eq!(as_i64(ids), read_ints(&io_set, "input_ids").expect("ids").0);
    assert_eq!(
        as_i64(mask),
        read_ints(&io_set, "attention_mask").expect("mask").0
    );
}

/// Copy the tiny BERT folder with its tensors renamed by `rename` (None drops one) and `extra`
/// tensors added.
fn rewritten_bert(
    rename: impl Fn(&str) -> Option<String>,
    extra: &[(&str, Vec<usize>)],
) -> tempfile::TempDir {
    let src = tiny("bert-chinese");
    let dir = tempfile::tempdir().expect("tempdir");
    for name in ["config.json", "vocab.txt", "tokenizer_config.json"] {
        std::fs::copy(src.join(name), dir.path().join(name)).expect("copy");
    }
    let bytes = std::fs::read(src.join("model.safetensors")).expect("read");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("parse");
    let extra_bytes: Vec<(String, Vec<usize>, Vec<u8>)> = extra
        .iter()
        .map(|(k, shape)| {
            (
                k.to_string(),
                shape.clone(),
                vec![0u8; 4 * shape.iter().product::<usize>()],
            )
        })
        .collect();
    let mut views: Vec<(String, safetensors::tensor::TensorView)> = st
        .tensors()
        .into_iter()
        .filter_map(|(k, v)| rename(&k).map(|k| (k, v)))
        .collect();
    for (k, shape, b) in &extra_bytes {
        let view =
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), b).expect("view");
        views.push((k.clone(), view));
    }
    let out = safetensors::serialize(views, None).expect("serialize");
    std::fs::write(dir.path().join("model.safetensors"), out).expect("write");
    dir
}

/// A BERT file without pooler weights (a `BertForMaskedLM` encoder) loads without a pooler and
/// gives transformers' last hidden state; RFNet never reads the pooler.
#[test]
fn parity_bert_without_pooler_loads() {
    let dir = rewritten_bert(|k| (!k.starts_with("pooler.")).then(|| format!("bert.{k}")), &[("cls.predictions.bias", vec![21128])]);
    let (model, _) = load_bert::<B>(dir.path(), DType::F32, &device()).expect("load without a pooler");
    assert!(model.pooler.is_none());
    let io_set = open(&[&fixture("bert.io.safetensors")]);
    let out = model.forward(
        bert_inputs(&io_set, "input_ids"),
        bert_inputs(&io_set, "attention_mask"),
        Some(bert_inputs(&io_set, "token_type_ids")),
    );
    assert!(out.pooler_output.is_none());
    assert_close("bert (no pooler) last_hidden_state", out.last_hidden_state, io(&io_set, "last_hidden_state"), 1e-4);
}

#[test]
fn weights_bert_prefixed_gamma_beta_checkpoint_loads() {
    // A BertForPreTraining-style file: `bert.` prefix, TF-era LayerNorm names, an MLM head and a
    // position_ids buffer.
    let dir = rewritten_bert(
        |k| {
            let k = k
                .replace("LayerNorm.weight", "LayerNorm.gamma")
                .replace("LayerNorm.bias", "LayerNorm.beta");
            Some(format!("bert.{k}"))
        },
        &[
            ("cls.predictions.bias", vec![21128]),
            ("bert.embeddings.position_ids", vec![1, 64]),
        ],
    );
    let st =
        rfstudio::models::weights::SafetensorsFile::open(dir.path().join("model.safetensors")).expect("open");
    assert!(
        st.tensors()
            .contains_key("bert.encoder.layer.1.output.LayerNorm.gamma")
    );
    assert!(
        st.tensors()
            .contains_key("bert.encoder.layer.0.attention.self.query.weight")
    );
    let (_, mut report) = load_bert::<B>(dir.path(), DType::F32, &device()).expect("load");
    report.unused.sort();
    assert_eq!(
        report.unused,
        vec![
            "bert.embeddings.position_ids".to_string(),
            "cls.predictions.bias".to_string()
        ]
    );
    let (hidden, pooled) = assert_bert_matches(dir.path(), "bert (bert. prefix, gamma/beta)");
    // The same tensors under other names: bit-identical outputs.
    let (ref_hidden, ref_pooled) = assert_bert_matches(&tiny("bert-chinese"), "bert");
    assert_eq!(max_abs_diff(hidden, ref_hidden), 0.0);
    assert_eq!(max_abs_diff(pooled, ref_pooled), 0.0);
}

#[test]
fn weights_bert_renamed_tensor_names_file_and_key() {
    let renamed = "encoder.layer.1.intermediate.dense.weight";
    let dir = rewritten_bert(
        |k| {
            Some(if k == renamed {
                "encoder.layer.1.intermediate.dense_renamed.weight".into()
            } else {
                k.to_string()
            })
        },
        &[],
    );
    let err = match load_bert::<B>(dir.path(), DType::F32, &device()) {
        Ok(_) => panic!("a renamed tensor loaded"),
        Err(e) => e.to_string(),
    };
    let file = dir.path().join("model.safetensors");
    assert!(err.contains(&file.display().to_string()), "{err}");
    assert!(err.contains(renamed), "{err}");
    assert!(err.contains("dense_renamed"), "{err}");
    // An unknown extra tensor (not a `cls.*` head or a buffer) is refused too.
    let dir = rewritten_bert(|k| Some(k.to_string()), &[("decoder.extra.weight", vec![2])]);
    let err = load_bert::<B>(dir.path(), DType::F32, &device())
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        err.contains("decoder.extra.weight") && err.contains("model.safetensors"),
        "{err}"
    );
}

#[test]
fn weights_resnet_unexpected_tensor_is_refused() {
    // `num_batches_tracked` is the only tensor a ResNet checkpoint may carry unused.
    let src = tiny("resnet50");
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::copy(src.join("config.json"), dir.path().join("config.json")).expect("copy");
    let bytes = std::fs::read(src.join("model.safetensors")).expect("read");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("parse");
    let extra = vec![0u8; 8];
    let mut views: Vec<(String, safetensors::tensor::TensorView)> = st.tensors();
    views.push((
        "head.extra".into(),
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![2], &extra).expect("view"),
    ));
    std::fs::write(
        dir.path().join("model.safetensors"),
        safetensors::serialize(views, None).expect("ser"),
    )
    .expect("write");
    let err = load_resnet::<B>(dir.path(), DType::F32, &device())
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        err.contains("head.extra") && err.contains("model.safetensors"),
        "{err}"
    );
}

#[test]
fn parity_tokenizer_bert_vocab_crlf_and_u2028() {
    // vocab.txt splits on '\n' only: U+2028 is a token of the Chinese vocabulary, not a line
    // break; a CRLF copy of the file gives the same ids.
    let src = tiny("bert-chinese");
    let tokens = read_vocab(&src.join("vocab.txt")).expect("vocab");
    assert_eq!(tokens.len(), 21128);
    assert_eq!(tokens[343], "\u{2028}");
    assert_eq!(tokens[13502], "##\u{2028}");
    let dir = tempfile::tempdir().expect("tempdir");
    let crlf = std::fs::read_to_string(src.join("vocab.txt"))
        .expect("read")
        .replace('\n', "\r\n");
    std::fs::write(dir.path().join("vocab.txt"), crlf).expect("write");
    std::fs::copy(
        src.join("tokenizer_config.json"),
        dir.path().join("tokenizer_config.json"),
    )
    .expect("copy");
    assert_eq!(read_vocab(&dir.path().join("vocab.txt")).expect("vocab"), tokens);
    let lf = BertTokenizer::from_folder(&src).expect("tokenizer");
    let crlf = BertTokenizer::from_folder(dir.path()).expect("tokenizer");
    for text in [
        "Nordic Red Fabric Dining Chair 北欧餐椅",
        "[CLS] 特殊 [SEP]",
        "Café Crème ½",
    ] {
        assert_eq!(
            crlf.encode(text, 16).expect("enc"),
            lf.encode(text, 16).expect("enc"),
            "{text:?}"
        );
    }
}
