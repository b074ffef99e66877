//! `rfstudio info`: what this build can run on and which models are installed.

use std::time::Instant;

use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use serde::Serialize;

use super::{CliError, GlobalArgs};
use crate::device::{self, BackendJob, BackendProbe, DeviceRequest, Precision, Selection};
use crate::models::manifest::{Manifest, RoleReport, Status};

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
}

/// A 2x2 matmul on the selected device: proves kernels compile and run there.
struct Smoke;

impl BackendJob for Smoke {
    type Output = Result<String, String>;
    fn run<B: Backend>(self, device: B::Device) -> Self::Output {
        let start = Instant::now();
        let a = Tensor::<B, 2>::from_data(TensorData::new(vec![1.0f32, 2.0, 3.0, 4.0], [2, 2]), &device);
        let b = a.clone().matmul(a);
        let v = b
            .into_data()
            .convert::<f32>()
            .to_vec::<f32>()
            .map_err(|e| format!("{e:?}"))?;
        if v == [7.0, 10.0, 15.0, 22.0] {
            Ok(format!("ok ({:.1} ms)", start.elapsed().as_secs_f64() * 1e3))
        } else {
            Err(format!("wrong result {v:?}"))
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
        models: manifest.check_all(),
    }
}

pub fn run(global: &GlobalArgs) -> Result<(), CliError> {
    let manifest = global.manifest()?;
    let report = gather(&manifest, global.device, global.dtype);
    if global.json {
        let line = serde_json::to_string(&report).map_err(anyhow::Error::from)?;
        println!("{line}");
    } else {
        print_text(&report);
    }
    Ok(())
}

fn print_text(r: &InfoReport) {
    println!("rfstudio {}", r.version);
    println!("backends compiled in: {}", r.compiled_backends.join(", "));
    for b in &r.backends {
        let state = match (b.compiled, b.available) {
            (false, _) => "not built",
            (true, true) => "available",
            (true, false) => "unavailable",
        };
        println!("  {:<7} {:<12} {}", b.backend, state, b.detail);
    }
    match (&r.selected, &r.selection_error) {
        (Some(s), _) => println!("selected: {} [dtype {}]", s.notice, r.dtype),
        (None, Some(e)) => println!("selected: none — {e}"),
        _ => {}
    }
    if let Some(s) = &r.smoke_test {
        println!("smoke test on the selected device: {s}");
    }
    match &r.manifest {
        Some(m) => println!(
            "models: {m}{}",
            if r.test_weights {
                " (RANDOM TEST WEIGHTS: outputs are noise and are marked as such)"
            } else {
                ""
            }
        ),
        None => println!("models: no models.toml found (use --models DIR)"),
    }
    for m in &r.models {
        let path = m
            .path
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "-".into());
        match &m.status {
            Status::Found(d) => println!("  {:<10} found    {path}\n             {d}", m.role.name()),
            Status::Missing(d) => println!(
                "  {:<10} missing  {d}\n             install: {}",
                m.role.name(),
                m.role.install_hint()
            ),
            Status::Invalid(d) => println!(
                "  {:<10} INVALID  {d}\n             install: {}",
                m.role.name(),
                m.role.install_hint()
            ),
        }
    }
}
