//! `rfstudio info`: what this build can run on and which models are installed.

use crate::tr;
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
    println!("{}", tr!("cli.info_backends", backends = r.compiled_backends.join(", ")));
    for b in &r.backends {
        let state = match (b.compiled, b.available) {
            (false, _) => tr!("models.backend_not_built"),
            (true, true) => tr!("models.backend_available"),
            (true, false) => tr!("models.backend_unavailable"),
        };
        println!("  {:<7} {:<12} {}", b.backend, state, b.detail);
    }
    match (&r.selected, &r.selection_error) {
        (Some(s), _) => println!("{}", tr!("models.selected", device = s.notice, dtype = r.dtype)),
        (None, Some(e)) => println!("{}", tr!("models.selected_none", error = e)),
        _ => {}
    }
    if let Some(s) = &r.smoke_test {
        println!("{}", tr!("models.smoke_test", result = s));
    }
    match &r.manifest {
        Some(m) if r.test_weights => println!("{}", tr!("cli.info_models_test_weights", manifest = m)),
        Some(m) => println!("{}", tr!("cli.info_models", manifest = m)),
        None => println!("{}", tr!("cli.info_no_manifest")),
    }
    for m in &r.models {
        let path = m
            .path
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "-".into());
        match &m.status {
            Status::Found(d) => println!("  {:<10} {:<8} {path}\n             {d}", m.role.name(), tr!("models.found")),
            Status::Missing(d) => println!(
                "  {:<10} {:<8} {d}\n             {}",
                m.role.name(),
                tr!("models.missing"),
                tr!("models.install", hint = m.role.install_hint())
            ),
            Status::Invalid(d) => println!(
                "  {:<10} {:<8} {d}\n             {}",
                m.role.name(),
                tr!("models.invalid"),
                tr!("models.install", hint = m.role.install_hint())
            ),
        }
    }
    if let Some(tiny) = &r.demo_models {
        println!("{}", tr!("cli.info_demo", tiny = tiny.display()));
    }
}
