//! How the models compute attention and GroupNorm on the device a job runs on, as a value: a
//! [`KernelPolicy`] built per job from `--attention`, the backend and the environment switches,
//! and installed by the device layer for the job's thread ([`scoped`]) while the job runs. The
//! ops (`fused`, `autodiff_ops`, `kernels`) read it with [`current`].
//!
//! The policy is scoped to the job rather than stored in each model: a studio that runs a CPU job
//! after a GPU one gets the CPU policy for it, two jobs on two threads do not see each other's
//! choice, and every model (loaded from any checkpoint layout) takes it without a field of its own.
//! Outside a job (unit tests, a model called directly) [`KernelPolicy::default`] applies: burn's
//! fused attention and rfstudio's own ops, as on the CPU backend.

use std::cell::Cell;

use crate::switches::Switches;

/// An `--attention` or flash-kernel name that is not one of the choices.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PolicyParseError {
    #[error("unknown attention implementation `{0}` (use auto, fused, matmul, flash or flash:KERNEL, e.g. flash:tc:4:1:2)")]
    Attention(String),
    #[error("unknown flash-attention kernel `{0}` (use `unit` or `tc:PLANES:Q:KV`, e.g. `tc:4:1:2`)")]
    FlashKernel(String),
}

/// How `fused::sdpa` computes attention. burn 0.21 offers a fused (flash) attention op with autotune;
/// on an H100 with SD 1.5's 40-wide heads, a plain `softmax(QK^T)V` of three kernels was faster
/// for self-attention over 4096 tokens (f16, 2x8 heads: 2.46 ms vs 3.80 ms) and slightly slower
/// for cross-attention over 77 text tokens (0.213 vs 0.192 ms). Both are exact to rounding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttentionImpl {
    /// Fused everywhere, except long key sequences (>= 1024) on backends that asked for the
    /// matmul form with [`KernelPolicy::long_attention_matmul`] (the CUDA backend does).
    Auto,
    /// burn's `attention` op (flash attention where the backend has one, picked by autotune).
    Fused,
    /// `softmax(Q K^T * scale) V` with two matmuls.
    Matmul,
    /// On the cubecl backends (CUDA, wgpu), cubek's flash-attention kernel named here, without
    /// autotune (`kernels::flash_attention`); shapes it cannot tile take the matmul form.
    /// Elsewhere the same as `Fused`.
    Flash(FlashKernel),
}

/// Key-sequence length from which [`AttentionImpl::Auto`] may use the matmul form.
pub const LONG_ATTENTION: usize = 1024;

impl std::str::FromStr for AttentionImpl {
    type Err = PolicyParseError;
    /// `auto`, `fused`, `matmul`, `flash` (the default kernel) or `flash:KERNEL` (`flash:unit`,
    /// `flash:tc:4:1:2`, see [`FlashKernel`]).
    fn from_str(s: &str) -> Result<Self, PolicyParseError> {
        let s = s.trim().to_ascii_lowercase();
        match s.as_str() {
            "auto" => return Ok(Self::Auto),
            "fused" => return Ok(Self::Fused),
            "matmul" | "naive" => return Ok(Self::Matmul),
            "flash" => return Ok(Self::Flash(FlashKernel::DEFAULT)),
            _ => {}
        }
        match s.strip_prefix("flash:") {
            Some(kernel) => kernel.parse().map(Self::Flash),
            None => Err(PolicyParseError::Attention(s)),
        }
    }
}

impl std::fmt::Display for AttentionImpl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AttentionImpl::Auto => write!(f, "auto"),
            AttentionImpl::Fused => write!(f, "fused"),
            AttentionImpl::Matmul => write!(f, "matmul"),
            AttentionImpl::Flash(kernel) => write!(f, "flash:{kernel}"),
        }
    }
}

/// Which of cubek's flash-attention kernels `kernels::flash_attention` launches (burn 0.21's autotune only
/// ever tries `tc:2|4|8:1:1` and `unit`, and benchmarks them on every new shape). Written
/// `tc:PLANES:Q:KV` or `unit` (see [`FlashKernel::from_str`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FlashKernel {
    /// Tensor-core (cmma, 16x16x16) tiles: `planes` planes per cube, each taking `seq_q` query
    /// tiles of 16 rows against `seq_kv` key tiles of 16 per step of its loop.
    TensorCore { planes: u8, seq_q: u8, seq_kv: u8 },
    /// Per-unit register tiles, no tensor cores (one plane-wide stage of 8-row query tiles).
    Unit,
}

impl FlashKernel {
    /// The kernel `--attention flash` uses (not yet chosen by measurement: see README).
    pub const DEFAULT: FlashKernel = FlashKernel::TensorCore { planes: 4, seq_q: 1, seq_kv: 1 };

    /// The candidates `bench ops` times side by side.
    pub const CANDIDATES: [FlashKernel; 9] = [
        FlashKernel::TensorCore { planes: 2, seq_q: 1, seq_kv: 1 },
        FlashKernel::TensorCore { planes: 4, seq_q: 1, seq_kv: 1 },
        FlashKernel::TensorCore { planes: 8, seq_q: 1, seq_kv: 1 },
        FlashKernel::TensorCore { planes: 4, seq_q: 1, seq_kv: 2 },
        FlashKernel::TensorCore { planes: 4, seq_q: 1, seq_kv: 4 },
        FlashKernel::TensorCore { planes: 4, seq_q: 2, seq_kv: 1 },
        FlashKernel::TensorCore { planes: 4, seq_q: 2, seq_kv: 2 },
        FlashKernel::TensorCore { planes: 8, seq_q: 1, seq_kv: 2 },
        FlashKernel::Unit,
    ];

    /// Query rows and keys a call must be a whole multiple of (and at least) for this kernel:
    /// cubek 0.2 decides whether to check bounds with the divisibility test the wrong way round
    /// (`stage % problem` instead of `problem % stage`), so a sequence shorter than one stage that
    /// divides it would be read out of bounds; whole multiples never need the checks.
    pub fn multiples(self) -> (usize, usize) {
        match self {
            FlashKernel::TensorCore { planes, seq_q, seq_kv } => {
                (16 * planes.max(1) as usize * seq_q.max(1) as usize, 16 * seq_kv.max(1) as usize)
            }
            // 8-row tiles times one plane (up to 64 units): 512 rows; key tiles of at most 16.
            FlashKernel::Unit => (512, 16),
        }
    }

    /// Whether `queries` x `keys` is a whole number of this kernel's tiles ([`Self::multiples`]).
    pub fn takes(self, queries: usize, keys: usize) -> bool {
        let (mq, mkv) = self.multiples();
        queries >= mq && queries % mq == 0 && keys >= mkv && keys % mkv == 0
    }
}

impl std::fmt::Display for FlashKernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FlashKernel::TensorCore { planes, seq_q, seq_kv } => write!(f, "tc:{planes}:{seq_q}:{seq_kv}"),
            FlashKernel::Unit => write!(f, "unit"),
        }
    }
}

impl std::str::FromStr for FlashKernel {
    type Err = PolicyParseError;
    /// `unit`, or `tc:PLANES:Q:KV` with PLANES in 1..=16 and Q, KV in 1..=8.
    fn from_str(s: &str) -> Result<Self, PolicyParseError> {
        let s = s.trim().to_ascii_lowercase();
        if s == "unit" {
            return Ok(FlashKernel::Unit);
        }
        let bad = || PolicyParseError::FlashKernel(s.clone());
        let parts: Vec<&str> = s.split(':').collect();
        let [tag, planes, q, kv] = parts.as_slice() else {
            return Err(bad());
        };
        if *tag != "tc" {
            return Err(bad());
        }
        let num = |v: &str, max: u8| v.parse::<u8>().ok().filter(|n| (1..=max).contains(n));
        match (num(planes, 16), num(q, 8), num(kv, 8)) {
            (Some(planes), Some(seq_q), Some(seq_kv)) => Ok(FlashKernel::TensorCore { planes, seq_q, seq_kv }),
            _ => Err(bad()),
        }
    }
}


/// The kernel choices a job runs with. Built by the device layer with [`KernelPolicy::for_backend`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelPolicy {
    /// `--attention`.
    pub attention: AttentionImpl,
    /// [`AttentionImpl::Auto`] uses the matmul form from [`LONG_ATTENTION`] keys on (measured
    /// faster than burn's fused op on an H100 at 4096 keys: the CUDA backend).
    pub long_attention_matmul: bool,
    /// Fused-attention calls are shaped for cubecl's tensor-core flash kernel (the cubecl
    /// backends: CUDA, wgpu, Vulkan; see `fused::sdpa_fused`).
    pub flash_shaping: bool,
    /// `RFSTUDIO_GROUPNORM=burn`: burn's GroupNorm on the GPU backends too.
    pub burn_group_norm: bool,
    /// `RFSTUDIO_ATTENTION_BACKWARD=plain`: burn's autodiff of attention.
    pub plain_attention_backward: bool,
    /// `RFSTUDIO_GROUPNORM_BACKWARD=plain`: burn's autodiff of GroupNorm.
    pub plain_group_norm_backward: bool,
}

impl Default for KernelPolicy {
    fn default() -> Self {
        Self {
            attention: AttentionImpl::Auto,
            long_attention_matmul: false,
            flash_shaping: false,
            burn_group_norm: false,
            plain_attention_backward: false,
            plain_group_norm_backward: false,
        }
    }
}

impl KernelPolicy {
    /// The policy for a job on a backend: `cubecl` for CUDA / wgpu / Vulkan, `cuda` for CUDA.
    pub fn for_backend(attention: AttentionImpl, cubecl: bool, cuda: bool, switches: &Switches) -> Self {
        Self {
            attention,
            long_attention_matmul: cuda,
            flash_shaping: cubecl,
            burn_group_norm: switches.burn_group_norm,
            plain_attention_backward: switches.plain_attention_backward,
            plain_group_norm_backward: switches.plain_group_norm_backward,
        }
    }
}

thread_local! {
    static CURRENT: Cell<KernelPolicy> = Cell::new(KernelPolicy::default());
}

/// The policy of the job running on this thread ([`KernelPolicy::default`] outside one).
pub fn current() -> KernelPolicy {
    CURRENT.with(|c| c.get())
}

/// Run `f` with `policy` installed for this thread; the previous policy comes back afterwards,
/// also when `f` panics.
pub fn scoped<T>(policy: KernelPolicy, f: impl FnOnce() -> T) -> T {
    struct Restore(KernelPolicy);
    impl Drop for Restore {
        fn drop(&mut self) {
            CURRENT.with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(CURRENT.with(|c| c.replace(policy)));
    f()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `--attention` values: the flash kernels by name, and clear errors for the rest.
    #[test]
    fn attention_impl_parses_flash_kernels() {
        let parse = |s: &str| s.parse::<AttentionImpl>();
        assert_eq!(parse("flash"), Ok(AttentionImpl::Flash(FlashKernel::DEFAULT)));
        assert_eq!(parse("flash:unit"), Ok(AttentionImpl::Flash(FlashKernel::Unit)));
        assert_eq!(
            parse(" FLASH:TC:8:2:1 "),
            Ok(AttentionImpl::Flash(FlashKernel::TensorCore { planes: 8, seq_q: 2, seq_kv: 1 }))
        );
        assert_eq!(parse("fused"), Ok(AttentionImpl::Fused));
        for bad in ["flash:tc:0:1:1", "flash:tc:4:1", "flash:tc:4:1:9", "flash:tc:a:1:1", "flash:wgmma", "flashy", ""] {
            let err = parse(bad).expect_err(bad).to_string();
            assert!(err.contains("flash") && err.contains('`'), "{bad}: {err}");
        }
        // Display gives back what parses to the same choice.
        for imp in FlashKernel::CANDIDATES.map(AttentionImpl::Flash).into_iter().chain([AttentionImpl::Auto, AttentionImpl::Matmul]) {
            assert_eq!(parse(&imp.to_string()), Ok(imp));
        }
        assert_eq!(FlashKernel::TensorCore { planes: 4, seq_q: 2, seq_kv: 2 }.multiples(), (128, 32));
    }

    /// A job's policy holds for its thread only and is gone when it ends, even by a panic: a
    /// CPU job after a GPU one runs with the CPU policy.
    #[test]
    fn policy_is_scoped_to_the_job() {
        let gpu = KernelPolicy::for_backend(AttentionImpl::Matmul, true, true, &Switches::default());
        assert_eq!(current(), KernelPolicy::default());
        scoped(gpu, || {
            assert_eq!(current(), gpu);
            let other = std::thread::spawn(current).join().expect("thread");
            assert_eq!(other, KernelPolicy::default(), "another thread keeps its own policy");
        });
        assert_eq!(current(), KernelPolicy::default());
        let panicked = std::panic::catch_unwind(|| scoped(gpu, || panic!("job failed")));
        assert!(panicked.is_err());
        assert_eq!(current(), KernelPolicy::default());
    }
}
