//! What the benchmark commands share: their error type, device synchronisation and the timing
//! loop.

use std::time::Instant;

use burn::tensor::backend::Backend;

use crate::models::policy::PolicyParseError;

/// Why a benchmark could not run or report (exit 1).
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("device sync failed: {0}")]
    Sync(String),
    #[error("--resolution {0} must be a multiple of 64")]
    Resolution(usize),
    #[error("--flash: {0}")]
    FlashKernel(#[from] PolicyParseError),
    #[error("the text encoder returned no output")]
    NoOutput,
    /// Building models, a sampling loop or the report failed.
    #[error(transparent)]
    Failed(Box<dyn std::error::Error + Send + Sync>),
}

/// `map_err(failed)`: any error (or message) met while building or running a benchmark.
pub fn failed(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> BenchError {
    BenchError::Failed(e.into())
}

pub fn sync<B: Backend>(device: &B::Device) -> Result<(), BenchError> {
    B::sync(device).map_err(|e| BenchError::Sync(format!("{e:?}")))
}

/// Mean milliseconds per call after `warm` unmeasured calls, synchronising the device around the
/// measured ones; every output is kept alive until the final sync so that no lazy backend can
/// skip work whose result is never read.
pub fn time_ms<B: Backend, T>(device: &B::Device, warm: usize, iters: usize, mut f: impl FnMut() -> T) -> Result<f64, BenchError> {
    let mut keep = Vec::with_capacity(warm + iters);
    for _ in 0..warm {
        keep.push(f());
    }
    sync::<B>(device)?;
    keep.clear();
    let start = Instant::now();
    for _ in 0..iters.max(1) {
        keep.push(f());
    }
    sync::<B>(device)?;
    let ms = start.elapsed().as_secs_f64() * 1e3 / iters.max(1) as f64;
    drop(keep);
    Ok(ms)
}
