//! Shared helpers for integration tests.

use std::path::{Path, PathBuf};

use burn::tensor::Tensor;
use rfstudio::models::weights::{Weights, read_tensor};

pub type B = burn::backend::Flex;

pub fn device() -> burn::backend::flex::FlexDevice {
    burn::backend::flex::FlexDevice
}

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn fixture(name: &str) -> PathBuf {
    root().join("tests").join("fixtures").join(name)
}

pub fn open(paths: &[&Path]) -> Weights {
    let paths: Vec<PathBuf> = paths.iter().map(|p| p.to_path_buf()).collect();
    Weights::open(&paths).unwrap_or_else(|e| panic!("opening fixture: {e}"))
}

/// Load tensor `key` from a fixture's `.io.safetensors`.
pub fn io<const D: usize>(io: &Weights, key: &str) -> Tensor<B, D> {
    read_tensor::<B, D>(io, key, &device()).unwrap_or_else(|e| panic!("{e}"))
}

pub fn max_abs_diff<const D: usize>(a: Tensor<B, D>, b: Tensor<B, D>) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    let d = (a - b).abs().max().into_data().convert::<f32>();
    d.to_vec::<f32>().expect("f32")[0]
}

/// Assert two tensors agree within `tol` (max abs error), printing the figure.
pub fn assert_close<const D: usize>(name: &str, ours: Tensor<B, D>, reference: Tensor<B, D>, tol: f32) {
    let err = max_abs_diff(ours, reference);
    eprintln!("{name}: max abs error {err:.3e} (tolerance {tol:.0e})");
    assert!(err <= tol, "{name}: max abs error {err} > {tol}");
}
