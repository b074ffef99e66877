//! `rfstudio info`: what this build can run on and which models are installed.

use super::{CliError, GlobalArgs};
use crate::models::manifest::Status;
use crate::pipeline::info::{InfoReport, gather};

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
    if let Some(tiny) = &r.demo_models {
        println!(
            "the studio runs in demo mode on the tiny random-weight models in {} until the base and ControlNet models are installed",
            tiny.display()
        );
    }
}
