//! The environment switches that are not command-line options, read here and nowhere else
//! (README lists them with the options' own variables). Each read is fresh: a long-lived
//! process (the studio) picks up no stale value, and a job takes what the environment says
//! when it starts.

use std::ffi::OsString;
use std::path::PathBuf;

/// The `RFSTUDIO_*` switches for kernels, logs and caches.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Switches {
    /// `RFSTUDIO_GROUPNORM=burn`: burn's GroupNorm (+ SiLU) instead of rfstudio's fused kernel
    /// on the GPU backends.
    pub burn_group_norm: bool,
    /// `RFSTUDIO_ATTENTION_BACKWARD=plain`: burn's autodiff of attention (stores the
    /// probabilities) instead of the recomputing backward.
    pub plain_attention_backward: bool,
    /// `RFSTUDIO_GROUPNORM_BACKWARD=plain`: burn's autodiff of GroupNorm instead of the
    /// recomputing backward.
    pub plain_group_norm_backward: bool,
    /// `RFSTUDIO_KERNEL_CACHE`: where compiled GPU kernels and autotune results are kept.
    pub kernel_cache: Option<PathBuf>,
    /// `RFSTUDIO_AUTOTUNE_LOG`: `stderr` or a file for one line per tuned shape.
    pub autotune_log: Option<String>,
    /// `RFSTUDIO_PROFILE_LOG`: a file for every kernel launch with its time.
    pub profile_log: Option<OsString>,
    /// `RFSTUDIO_PEER_SUM=collective`: data-parallel CUDA GPUs sum through burn-collective
    /// (copies between devices) instead of NCCL.
    pub collective_on_cuda: bool,
}

impl Switches {
    /// The switches as the environment sets them now.
    pub fn from_env() -> Self {
        Self::from_lookup(|name| std::env::var_os(name))
    }

    /// The switches from any variable lookup (the environment, or a test's map).
    pub fn from_lookup(get: impl Fn(&str) -> Option<OsString>) -> Self {
        let text = |name: &str| get(name).and_then(|v| v.into_string().ok()).map(|v| v.trim().to_string());
        let is = |name: &str, value: &str| text(name).is_some_and(|v| v.eq_ignore_ascii_case(value));
        Self {
            burn_group_norm: is("RFSTUDIO_GROUPNORM", "burn"),
            plain_attention_backward: is("RFSTUDIO_ATTENTION_BACKWARD", "plain"),
            plain_group_norm_backward: is("RFSTUDIO_GROUPNORM_BACKWARD", "plain"),
            kernel_cache: get("RFSTUDIO_KERNEL_CACHE").filter(|v| !v.is_empty()).map(PathBuf::from),
            autotune_log: text("RFSTUDIO_AUTOTUNE_LOG").filter(|v| !v.is_empty()),
            profile_log: get("RFSTUDIO_PROFILE_LOG").filter(|v| !v.is_empty()),
            collective_on_cuda: is("RFSTUDIO_PEER_SUM", "collective"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn switches_read_their_values_and_ignore_the_rest() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| pairs.iter().find(|(n, _)| *n == name).map(|(_, v)| OsString::from(*v))
        };
        assert_eq!(Switches::from_lookup(env(&[])), Switches::default());
        let s = Switches::from_lookup(env(&[
            ("RFSTUDIO_GROUPNORM", " Burn "),
            ("RFSTUDIO_ATTENTION_BACKWARD", "plain"),
            ("RFSTUDIO_GROUPNORM_BACKWARD", "fast"),
            ("RFSTUDIO_KERNEL_CACHE", "/tmp/k"),
            ("RFSTUDIO_AUTOTUNE_LOG", ""),
            ("RFSTUDIO_PEER_SUM", "Collective"),
        ]));
        assert!(s.burn_group_norm && s.plain_attention_backward && !s.plain_group_norm_backward && s.collective_on_cuda);
        assert_eq!(s.kernel_cache, Some(PathBuf::from("/tmp/k")));
        assert_eq!(s.autotune_log, None);
    }
}
