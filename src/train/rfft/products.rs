//! RFFT's products: placed once with generation's placement, their prompts encoded, their
//! latents and tensors computed on the inner backend, then stacked into batches.

use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};

use super::config::{ProductSpec, RfftConfig};
use super::error::RfftError;
use super::objective::Batch;
use crate::models::clip::{ClipTextModel, ClipTokenizer};
use crate::models::vae::{AutoencoderKL, VaeConfig};
use crate::pipeline::generate::seeded_noise;
use crate::pipeline::judge::Judge;
use crate::pipeline::product::{PlacedProduct, Placement, ProductTensors, place_file};
use crate::pipeline::sampler::{Conditioning, Inpaint};

/// A product ready for batching: its placement, prompt embedding, latent and tensors.
pub struct PreparedProduct<B: Backend> {
    pub name: String,
    pub title: String,
    pub placed: PlacedProduct,
    /// [2, 77, D] (negative, prompt).
    pub context: Tensor<B, 3>,
    /// [1, 4, h, w] scaled latents.
    pub image_latents: Tensor<B, 4>,
    pub tensors: ProductTensors<B>,
    /// [1, 3, s, s] RFNet's product input.
    pub rfnet_product: Tensor<B, 4>,
}

/// Place every product, encode its prompts and its latent (inference, no gradients).
pub fn prepare_products<B: Backend>(
    specs: &[ProductSpec],
    text: (&ClipTokenizer, &ClipTextModel<B>),
    vae: (&AutoencoderKL<B>, &VaeConfig),
    judge: &Judge<B>,
    config: &RfftConfig,
    device: &B::Device,
) -> Result<Vec<PreparedProduct<B>>, RfftError> {
    let (tokenizer, text_encoder) = text;
    let (vae, vae_config) = vae;
    let placement = Placement {
        canvas: config.image_size,
        scale: config.product_scale,
        ..Placement::default()
    };
    let lat = (config.image_size as usize / vae_config.scale_factor()) as u32;
    let mut out = Vec::with_capacity(specs.len());
    for spec in specs {
        let placed = place_file(&spec.image, &placement)
            .map_err(|e| RfftError::Config(format!("product {:?}: {e}", spec.name())))?;
        let mut ids = Vec::with_capacity(2);
        for text in [&spec.negative, &spec.prompt] {
            let enc = tokenizer
                .encode(text)
                .map_err(|e| RfftError::Config(format!("product {:?}: {e}", spec.name())))?;
            ids.push(enc.ids);
        }
        let context = text_encoder.encode_ids(&ids, device);
        let tensors = placed.tensors::<B>(lat, device);
        let image_latents = vae.encode(tensors.init.clone()).mean.mul_scalar(vae_config.scaling_factor);
        out.push(PreparedProduct {
            name: spec.name(),
            title: spec.title.clone(),
            rfnet_product: judge.product_input(&placed.init_rgb(), device),
            placed,
            context,
            image_latents,
            tensors,
        });
    }
    Ok(out)
}

/// Stack products (with repetition) and their noise seeds into a batch.
pub fn make_batch<B: Backend>(
    products: &[&PreparedProduct<B>],
    seeds: &[u64],
    judge: &Judge<B>,
    device: &B::Device,
) -> Result<Batch<B>, RfftError> {
    let first = products.first().ok_or_else(|| RfftError::Train("empty batch".into()))?;
    let [_, c4, h, w] = first.image_latents.dims();
    let cat = |f: &dyn Fn(&PreparedProduct<B>) -> Tensor<B, 4>| Tensor::cat(products.iter().map(|p| f(p)).collect(), 0);
    let contexts: Vec<Tensor<B, 3>> = products.iter().map(|p| p.context.clone()).collect();
    let noise: Vec<f32> = seeds.iter().flat_map(|&sd| seeded_noise(sd, c4 * h * w)).collect();
    let noise = Tensor::from_data(TensorData::new(noise, [seeds.len(), c4, h, w]), device);
    let titles: Vec<&str> = products.iter().map(|p| p.title.as_str()).collect();
    let (caption_ids, caption_mask) = judge.captions(&titles, device)?;
    Ok(Batch {
        cond: Conditioning::per_sample(&contexts, Some(cat(&|p| p.tensors.control.clone()))),
        inpaint: Inpaint::new(cat(&|p| p.image_latents.clone()), cat(&|p| p.tensors.latent_mask.clone()), noise),
        alpha: cat(&|p| p.tensors.alpha.clone()),
        product_rgb: cat(&|p| p.tensors.rgb.clone()),
        rfnet_product: cat(&|p| p.rfnet_product.clone()),
        caption_ids,
        caption_mask,
    })
}
