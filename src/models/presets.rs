//! Architecture presets for building real-size models without a checkpoint (benchmarks with
//! random weights). Each mirrors the public checkpoint's own config.json:
//! - `SD15_UNET`: stable-diffusion-v1-5 `unet/config.json`
//! - `SD15_VAE`: stable-diffusion-v1-5 `vae/config.json`
//! - `SD15_TEXT`: stable-diffusion-v1-5 `text_encoder/config.json` (openai/clip-vit-large-patch14 text side)
//! - `SD15_CONTROLNET`: lllyasviel/sd-controlnet-canny `config.json`

pub const SD15_UNET: &str = r#"{
  "act_fn": "silu", "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
  "center_input_sample": false, "cross_attention_dim": 768,
  "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
  "downsample_padding": 1, "flip_sin_to_cos": true, "freq_shift": 0, "in_channels": 4,
  "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
  "out_channels": 4, "sample_size": 64,
  "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]
}"#;

pub const SD15_VAE: &str = r#"{
  "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
  "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
  "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
  "out_channels": 3, "sample_size": 512, "scaling_factor": 0.18215,
  "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"]
}"#;

pub const SD15_TEXT: &str = r#"{
  "vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
  "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
  "layer_norm_eps": 1e-05
}"#;

pub const SD15_CONTROLNET: &str = r#"{
  "act_fn": "silu", "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
  "conditioning_embedding_out_channels": [16, 32, 96, 256], "controlnet_conditioning_channel_order": "rgb",
  "cross_attention_dim": 768,
  "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
  "downsample_padding": 1, "flip_sin_to_cos": true, "freq_shift": 0, "in_channels": 4,
  "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32
}"#;

/// Intel/dpt-hybrid-midas `config.json` (the fields rfstudio reads): ViT-B/16 on a BiT-R50
/// backbone (stages [3, 4, 9]), neck [256, 512, 768, 768], fusion 256.
pub const DPT_HYBRID: &str = r#"{
  "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
  "hidden_act": "gelu", "layer_norm_eps": 1e-12, "image_size": 384, "patch_size": 16, "num_channels": 3,
  "qkv_bias": true, "is_hybrid": true, "backbone_out_indices": [2, 5, 8, 11], "readout_type": "project",
  "reassemble_factors": [4, 2, 1, 0.5], "neck_hidden_sizes": [256, 512, 768, 768], "fusion_hidden_size": 256,
  "add_projection": false, "use_batch_norm_in_fusion_residual": false, "neck_ignore_stages": [0, 1],
  "backbone_featmap_shape": [1, 1024, 24, 24],
  "backbone_config": {"depths": [3, 4, 9], "hidden_sizes": [256, 512, 1024], "embedding_size": 64,
    "num_groups": 32, "global_padding": "same", "layer_type": "bottleneck", "embedding_dynamic_padding": true,
    "width_factor": 1}
}"#;

/// bert-base-chinese `config.json` (RFNet's caption encoder at the paper's size).
pub const BERT_BASE_CHINESE: &str = r#"{
  "architectures": ["BertForMaskedLM"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
  "hidden_dropout_prob": 0.1, "hidden_size": 768, "initializer_range": 0.02, "intermediate_size": 3072,
  "layer_norm_eps": 1e-12, "max_position_embeddings": 512, "model_type": "bert", "num_attention_heads": 12,
  "num_hidden_layers": 12, "pad_token_id": 0, "type_vocab_size": 2, "vocab_size": 21128
}"#;
