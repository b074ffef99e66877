//! What can go wrong in an RFFT run, each kind with the exit code the CLI gives it.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum RfftError {
    /// Bad configuration or input (exit code 2).
    #[error("{0}")]
    Config(String),
    /// A model folder is missing or cannot be loaded (exit code 3).
    #[error("{0}")]
    Models(String),
    #[error("{}: {reason}", path.display())]
    Io { path: PathBuf, reason: String },
    /// The judge failed (models invalid, or non-finite outputs).
    #[error(transparent)]
    Judge(#[from] crate::pipeline::score::ScoreError),
    /// Sampling failed (NaN/Inf latents, ControlNet and UNet that do not fit).
    #[error(transparent)]
    Sampling(#[from] crate::pipeline::sd::SdError),
    #[error("{0}")]
    Train(String),
    /// A setting out of range (`run.toml`, or the memory the run needs).
    #[error("{0}")]
    Setting(#[from] crate::pipeline::params::InvalidSetting),
    /// The device could not be selected or set up, or the job panicked there.
    #[error(transparent)]
    Device(#[from] crate::device::DeviceError),
    /// The worker thread panicked (a bug); the job ends with this instead of never ending.
    #[error("the RFFT worker stopped unexpectedly: {0}")]
    Panicked(String),
    /// Another device of a data-parallel run failed (its own error is reported instead when
    /// it is known).
    #[error("another device of the run failed: {0}")]
    PeerFailed(String),
    /// The error of one device of a data-parallel run (other than the first).
    #[error("{peer}: {source}")]
    OnPeer { peer: String, source: Box<RfftError> },
    /// The run folder: a file that cannot be written, a corrupt checkpoint, a damaged state.
    #[error(transparent)]
    RunFolder(#[from] crate::train::run_folder::RunFolderError),
}

pub(crate) fn io_err(path: &Path, e: impl std::fmt::Display) -> RfftError {
    RfftError::Io {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}
