//! What this build can run on and which models are installed: the report behind `rfstudio
//! info` and the studio's Models tab.

use std::time::Instant;

use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use serde::Serialize;

use crate::device::{self, BackendJob, BackendProbe, DeviceRequest, Precision, Selection};
use crate::models::manifest::{Manifest, RoleReport};

/// Everything `rfstudio info` reports (the GUI's Models tab shows the same).
#[derive(Clone, Debug, Serialize)]
pub struct InfoReport {
    pub version: &'static str,
    pub compiled_backends: Vec<&'static str>,
    pub backends: Vec<BackendProbe>,
    pub selected: Option<Selection>,
    pub selection_error: Option<String>,
    pub dtype: String,
    pub smoke_test: Option<String>,
    pub manifest: Option<String>,
    pub test_weights: bool,
    pub models: Vec<RoleReport>,
    /// When the base or ControlNet model is not usable: the bundled tiny models the studio
    /// falls back to (demo mode).
    pub demo_models: Option<std::path::PathBuf>,
}

/// A 2x2 matmul on the selected device: proves kernels compile and run there.
struct Smoke;

#[derive(Debug, thiserror::Error)]
enum SmokeError {
    #[error("could not read the result back: {0:?}")]
    ReadBack(burn::tensor::DataError),
    #[error("wrong result {0:?}")]
    Wrong(Vec<f32>),
}

impl BackendJob for Smoke {
    type Output = Result<String, SmokeError>;
    fn run<B: Backend>(self, device: B::Device) -> Self::Output {
        let start = Instant::now();
        let a = Tensor::<B, 2>::from_data(TensorData::new(vec![1.0f32, 2.0, 3.0, 4.0], [2, 2]), &device);
        let b = a.clone().matmul(a);
        let v = b
            .into_data()
            .convert::<f32>()
            .to_vec::<f32>()
            .map_err(SmokeError::ReadBack)?;
        if v == [7.0, 10.0, 15.0, 22.0] {
            Ok(crate::tr!("device.smoke_ok", ms = format!("{:.1}", start.elapsed().as_secs_f64() * 1e3)))
        } else {
            Err(SmokeError::Wrong(v))
        }
    }
}

/// Probe the backends, resolve the device request, run the smoke test on it and check every
/// model role of the manifest. Slow (probing, kernel compilation): call it off the UI thread.
pub fn gather(manifest: &Manifest, request: DeviceRequest, precision: Precision) -> InfoReport {
    let backends = device::probe_all();
    let (selected, selection_error) = match device::select(request) {
        Ok(s) => (Some(s), None),
        Err(e) => (None, Some(e.to_string())),
    };
    let smoke_test = selected.as_ref().map(|s| match device::dispatch(s, precision, Smoke) {
        Ok(Ok(msg)) => msg,
        Ok(Err(msg)) => format!("FAILED: {msg}"),
        Err(e) => format!("FAILED: {e}"),
    });
    let models = manifest.check_all();
    InfoReport {
        version: env!("CARGO_PKG_VERSION"),
        compiled_backends: device::compiled_backends(),
        backends,
        selected,
        selection_error,
        dtype: precision.to_string(),
        smoke_test,
        manifest: manifest.source.as_ref().map(|p| p.display().to_string()),
        test_weights: manifest.test_weights,
        demo_models: demo_fallback(&models),
        models,
    }
}

/// The tiny models the studio runs on (demo mode) when `models` lacks a usable base or
/// ControlNet model; `None` when both are found or no tiny models ship with this build.
pub fn demo_fallback(models: &[RoleReport]) -> Option<std::path::PathBuf> {
    let usable = |r: crate::models::manifest::Role| {
        models
            .iter()
            .any(|x| x.role == r && matches!(x.status, crate::models::manifest::Status::Found(_)))
    };
    if usable(crate::models::manifest::Role::Base) && usable(crate::models::manifest::Role::Controlnet) {
        return None;
    }
    let tiny = crate::files::bundled("models/tiny");
    tiny.join("models.toml").is_file().then_some(tiny)
}

