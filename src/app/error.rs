//! What can go wrong in the studio's own plumbing (file dialogs, opening folders, decoding images
//! for display, resolving models, reading a form) and why a run cannot start yet. The tabs show
//! these with `errors::render_chain`, so every message appears once with its causes.

use std::path::PathBuf;

use crate::models::manifest::{ManifestError, Role};
use crate::pipeline::image_io::ImageReadError;
use crate::pipeline::product::ProductError;
use crate::tr;
use crate::train::rfft::RfftError;

#[derive(Debug, thiserror::Error)]
pub enum UiError {
    #[error("{}", tr!("common.err_open_folder", program = program, path = path.display(), source = source))]
    OpenFolder {
        program: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}", tr!("common.err_no_file_dialogs"))]
    NoFileDialogs,
    #[error("{}", tr!("common.err_no_dialog_service"))]
    NoDialogService,
    #[error(transparent)]
    Image(#[from] ImageReadError),
    #[error(transparent)]
    Product(#[from] ProductError),
    /// A preview derived from a product that could not be placed (its error is shown once, on
    /// the product's own preview).
    #[error("{}", tr!("common.err_no_preview"))]
    NoPreview,
    #[error("{}", tr!("common.err_loader_stopped"))]
    LoaderStopped,
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error(transparent)]
    NotReady(#[from] NotReady),
    #[error(transparent)]
    Form(#[from] FormError),
    #[error(transparent)]
    RunFolder(#[from] crate::pipeline::run_folder::RunFolderError),
    #[error("{}", tr!("generate.err_no_run_shown"))]
    NoRunShown,
}

/// Why a generation cannot start now.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotReady {
    #[error("{}", tr!("common.not_ready_checking"))]
    Checking,
    /// Resolving the models failed; the reason is the first error the Models tab shows.
    #[error("{0}")]
    ModelsUnresolved(String),
    #[error("{}", tr!("common.not_ready_models_unknown"))]
    ModelsUnknown,
    #[error("{}", tr!("common.not_ready_device_unchecked"))]
    DeviceUnchecked,
    /// No device could be selected; the reason is the device selection's message.
    #[error("{0}")]
    NoDevice(String),
    #[error("{}", tr!("common.not_ready_role", role = role, why = why))]
    Role { role: Role, why: String },
}

/// A form that cannot be turned into a job.
#[derive(Debug, thiserror::Error)]
pub enum FormError {
    #[error("{}", tr!("finetune.err_no_products"))]
    NoProducts,
    #[error("{}", tr!("finetune.err_no_prompts"))]
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
