//! RFNet: forward parity with the PyTorch re-implementation (written from PAPER.md in the fixture
//! script), save -> load round trip, corrupt checkpoints, and a learning test on synthetic data.

use burn::tensor::{DType, Int, Tensor, TensorData};
use rfstudio::models::bert::BertTokenizer;
use rfstudio::models::rfnet::{RfNetInput, load_rfnet};
use rfstudio::models::weights::{read_ints, save_module};

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
