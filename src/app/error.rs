//! What can go wrong in the studio's own plumbing (file dialogs, opening folders, decoding images
//! for display, resolving models, reading a form) and why a run cannot start yet. The tabs show
//! these with `errors::render_chain`, so every message appears once with its causes.

use std::path::PathBuf;

use crate::models::manifest::{ManifestError, Role};
use crate::pipeline::image_io::ImageReadError;
use crate::pipeline::product::ProductError;
use crate::train::rfft::RfftError;

#[derive(Debug, thiserror::Error)]
pub enum UiError {
    #[error("could not run {program} {}: {source}", path.display())]
    OpenFolder {
        program: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("this build has no native file dialogs (feature `gui`): type the path instead")]
    NoFileDialogs,
    #[error("no file dialog appeared (this desktop offers no file-chooser service): type the path into the field instead")]
    NoDialogService,
    #[error(transparent)]
    Image(#[from] ImageReadError),
    #[error(transparent)]
    Product(#[from] ProductError),
    /// A preview derived from a product that could not be placed (its error is shown once, on
    /// the product's own preview).
    #[error("no preview")]
    NoPreview,
    #[error("the image loader stopped")]
    LoaderStopped,
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error(transparent)]
    NotReady(#[from] NotReady),
    #[error(transparent)]
    Form(#[from] FormError),
    #[error(transparent)]
    RunFolder(#[from] crate::pipeline::run_folder::RunFolderError),
    #[error("no run is shown: open one from History first")]
    NoRunShown,
}

/// Why a generation cannot start now.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotReady {
    #[error("checking models and device…")]
    Checking,
    /// Resolving the models failed; the reason is the first error the Models tab shows.
    #[error("{0}")]
    ModelsUnresolved(String),
    #[error("models not resolved: see Models")]
    ModelsUnknown,
    #[error("device not checked yet: see Models")]
    DeviceUnchecked,
    /// No device could be selected; the reason is the device selection's message.
    #[error("{0}")]
    NoDevice(String),
    #[error("{role}: {why} (see Models)")]
    Role { role: Role, why: String },
}

/// A form that cannot be turned into a job.
#[derive(Debug, thiserror::Error)]
pub enum FormError {
    #[error("add at least one product")]
    NoProducts,
    #[error("enter at least one prompt (one per line)")]
    NoPrompts,
    #[error(transparent)]
    Rfft(#[from] RfftError),
}

impl UiError {
    /// The message as the tabs show it (each cause once).
    pub fn shown(&self) -> String {
        crate::errors::render_chain(self)
    }
}
