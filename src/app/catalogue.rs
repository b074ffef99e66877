//! Watching a catalogue queue from the Generate tab: a helper thread reads the queue's status
//! (`data::catalogue::JobQueue::status`) every two seconds and hands it to the UI; the tab shows
//! queued / running / done / failed, each worker's throughput and the failures with their
//! messages. The thread ends when the watch is stopped (its channel closes).

use std::sync::mpsc::{Receiver, channel};
use std::time::Duration;

use egui::RichText;

use super::settings::GenerateForm;
use crate::data::catalogue::{JobQueue, QueueStatus};
use crate::tr;

#[derive(Default)]
pub struct CatalogueWatch {
    rx: Option<Receiver<Result<QueueStatus, String>>>,
    pub status: Option<QueueStatus>,
    pub error: Option<String>,
}

impl CatalogueWatch {
    pub fn is_watching(&self) -> bool {
        self.rx.is_some()
    }

    pub fn start(&mut self, ctx: &egui::Context, url: &str) {
        let (tx, rx) = channel();
        let (url, wake) = (url.trim().to_string(), ctx.clone());
        self.status = None;
        self.error = None;
        let spawned = std::thread::Builder::new().name("rfstudio-catalogue".into()).spawn(move || {
            let queue = match JobQueue::connect(&url) {
                Ok(q) => q,
                Err(e) => {
                    let _ = tx.send(Err(e.to_string()));
                    wake.request_repaint();
                    return;
                }
            };
            loop {
                let status = queue.status(None).map_err(|e| e.to_string());
                let failed = status.is_err();
                if tx.send(status).is_err() || failed {
                    break;
                }
                wake.request_repaint();
                std::thread::sleep(Duration::from_secs(2));
            }
            wake.request_repaint();
        });
        match spawned {
            Ok(_) => self.rx = Some(rx),
            Err(e) => self.error = Some(e.to_string()),
        }
    }

    pub fn stop(&mut self) {
        self.rx = None;
    }

    /// Take the helper's news. Call once per frame.
    pub fn poll(&mut self) {
        let Some(rx) = &self.rx else { return };
        while let Ok(msg) = rx.try_recv() {
            match msg {
                Ok(s) => {
                    self.status = Some(s);
                    self.error = None;
                }
                Err(e) => {
                    self.error = Some(e);
                    self.rx = None;
                    return;
                }
            }
        }
    }
}

/// The queue's URL, Watch / Stop, and what the queue says.
pub fn watch_ui(ui: &mut egui::Ui, watch: &mut CatalogueWatch, form: &mut GenerateForm) {
    ui.label(RichText::new(tr!("generate.catalogue_hint")).weak().small());
    ui.horizontal(|ui| {
        ui.add(
            egui::TextEdit::singleline(&mut form.catalogue_db)
                .hint_text("postgres://user@host/db")
                .desired_width(200.0),
        );
        if watch.is_watching() {
            if ui.button(tr!("generate.catalogue_stop")).clicked() {
                watch.stop();
            }
        } else if ui
            .add_enabled(!form.catalogue_db.trim().is_empty(), egui::Button::new(tr!("generate.catalogue_watch")))
            .clicked()
        {
            watch.start(ui.ctx(), &form.catalogue_db);
        }
    });
    super::common::error_line(ui, watch.error.as_deref());
    let Some(s) = &watch.status else { return };
    let total = s.queued + s.running + s.done + s.failed;
    ui.label(tr!("generate.catalogue_counts", queued = s.queued, running = s.running, done = s.done, failed = s.failed));
    if total > 0 {
        ui.add(egui::ProgressBar::new((s.done + s.failed) as f32 / total as f32).show_percentage());
    }
    for w in &s.workers {
        ui.label(tr!("generate.catalogue_worker", worker = w.worker, done = w.done, per_hour = format!("{:.0}", w.per_hour)));
    }
    if !s.failures.is_empty() {
        ui.label(RichText::new(tr!("generate.catalogue_failures", n = s.failures.len())).strong());
        for (product, error) in s.failures.iter().take(5) {
            ui.label(RichText::new(format!("{product}: {error}")).small());
        }
    }
}
