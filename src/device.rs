//! Compute devices: which burn backends are compiled in, which of them can run on this machine,
//! and how a command's `--device` / `--dtype` choice becomes a concrete `B: Backend` + device.
//!
//! Probing never panics: CUDA is tried only when the driver library loads and reports a device,
//! wgpu adapters are enumerated behind `catch_unwind`, and the CPU backend (burn-flex) always works.

use std::fmt;

use burn::tensor::DType;
use burn::tensor::backend::Backend;
use serde::Serialize;

use crate::models::policy::{self, AttentionImpl, KernelPolicy};
use crate::switches::Switches;

#[cfg(feature = "cuda")]
mod nccl;
mod peers;
pub use peers::{Agreed, DeviceSet, Gate, Peer, Peers, Transport, Vote};

/// What the user asked for with `--device` (or `RFSTUDIO_DEVICE`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceRequest {
    /// CUDA if a driver and a GPU are present, else a hardware wgpu adapter, else the CPU.
    Auto,
    Cuda,
    Wgpu,
    Vulkan,
    Cpu,
}

/// A backend that was chosen and can run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    Cuda,
    Wgpu,
    Vulkan,
    Cpu,
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BackendKind::Cuda => "cuda",
            BackendKind::Wgpu => "wgpu",
            BackendKind::Vulkan => "vulkan",
            BackendKind::Cpu => "cpu",
        })
    }
}

/// Float precision for model weights and activations (`--dtype`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    F32,
    F16,
    Bf16,
}

impl Precision {
    pub fn dtype(self) -> DType {
        match self {
            Precision::F32 => DType::F32,
            Precision::F16 => DType::F16,
            Precision::Bf16 => DType::BF16,
        }
    }

    /// Bytes per float element.
    pub fn element_bytes(self) -> usize {
        match self {
            Precision::F32 => 4,
            Precision::F16 | Precision::Bf16 => 2,
        }
    }
}

/// The memory a job on `selection` may count on, for the size checks made before allocating:
/// the host's available memory for the CPU backend (an allocation failure there aborts the
/// process, so it must be refused up front). None for GPUs, whose allocation failures `dispatch`
/// catches and reports as errors.
pub fn memory_budget_bytes(selection: &Selection) -> Option<u64> {
    match selection.backend {
        BackendKind::Cpu => host_available_memory(),
        _ => None,
    }
}

/// `MemAvailable` of /proc/meminfo (Linux); None elsewhere.
pub fn host_available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Precision::F32 => "f32",
            Precision::F16 => "f16",
            Precision::Bf16 => "bf16",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error(
        "the `{0}` backend is not compiled into this build; rebuild with `--features {0}` or use `--device auto`"
    )]
    NotCompiled(&'static str),
    #[error("the `{backend}` backend is compiled in but cannot run here: {reason}")]
    Unavailable { backend: &'static str, reason: String },
    #[error(
        "{dtype} is not supported on the {backend} device ({device}); use `--dtype f32`{hint}"
    )]
    UnsupportedDtype {
        backend: BackendKind,
        device: String,
        dtype: Precision,
        hint: &'static str,
    },
    #[error("could not configure the {backend} device: {reason}")]
    Setup { backend: BackendKind, reason: String },
    /// The job itself panicked (a bug, or a backend failure such as running out of GPU memory):
    /// reported as an error instead of tearing down the process or a GUI worker.
    #[error("the job on the {backend} device stopped unexpectedly: {message}")]
    Panicked { backend: BackendKind, message: String },
    #[error("--devices {spec}: {reason}")]
    DeviceSet { spec: String, reason: String },
    #[error("{set}: {reason}")]
    PeerDevice { set: String, reason: String },
    /// Summing across data-parallel peers failed.
    #[error("data-parallel sum on {peer}: {reason}")]
    Collective { peer: String, reason: String },
}

impl DeviceError {
    /// Whether the input (the device request or precision) is at fault, as opposed to the job.
    pub fn is_bad_input(&self) -> bool {
        !matches!(self, DeviceError::Panicked { .. } | DeviceError::Collective { .. })
    }
}

/// The message of a caught panic payload.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "a panic without a message (see the log above)".into())
}

/// Peak resident memory of this process (Linux `VmHWM`): what a CPU job used at most.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Bytes held by live tensors on `device` when it is a cubecl GPU device (CUDA, wgpu/Vulkan):
/// the allocator's `bytes_in_use`, which is what a run's tensors occupy, not the pools it has
/// reserved. `None` on the CPU backend, and whenever the runtime cannot answer.
pub fn device_memory_in_use<D: Clone + 'static>(device: &D) -> Option<u64> {
    #[cfg(any(feature = "cuda", feature = "wgpu"))]
    {
        use std::any::Any;
        let any: &dyn Any = device;
        // cubecl answers through its device thread and unwraps that call: a runtime in trouble
        // must not take the training loop with it.
        let ask = |f: &dyn Fn() -> Option<u64>| std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).ok().flatten();
        #[cfg(feature = "cuda")]
        if let Some(d) = any.downcast_ref::<cubecl::cuda::CudaDevice>() {
            use cubecl::Runtime;
            return ask(&|| cubecl::cuda::CudaRuntime::client(d).memory_usage().ok().map(|u| u.bytes_in_use));
        }
        #[cfg(feature = "wgpu")]
        if let Some(d) = any.downcast_ref::<cubecl::wgpu::WgpuDevice>() {
            use cubecl::Runtime;
            return ask(&|| cubecl::wgpu::WgpuRuntime::client(d).memory_usage().ok().map(|u| u.bytes_in_use));
        }
    }
    let _ = device;
    None
}

/// The availability of one backend, as reported by `rfstudio info`.
#[derive(Clone, Debug, Serialize)]
pub struct BackendProbe {
    pub backend: &'static str,
    pub compiled: bool,
    pub available: bool,
    /// Adapter/device names or the reason it is unavailable.
    pub detail: String,
}

/// A wgpu adapter seen during probing.
#[derive(Clone, Debug, Serialize)]
pub struct AdapterInfo {
    pub name: String,
    pub backend: String,
    pub device_type: String,
    /// A software rasteriser (llvmpipe, SwiftShader, WARP): usable, but slower than our CPU backend.
    pub software: bool,
}

/// The outcome of resolving a `--device` request.
#[derive(Clone, Debug, Serialize)]
pub struct Selection {
    pub backend: BackendKind,
    /// Human-readable device name (GPU model, adapter, or "CPU (burn-flex, N threads)").
    pub device_name: String,
    /// One line explaining why this device was chosen.
    pub notice: String,
    /// `--attention`: with the backend, it decides the job's [`KernelPolicy`].
    #[serde(skip)]
    pub attention: AttentionImpl,
}

impl Selection {
    /// The same device with `attention` as the `--attention` choice.
    pub fn with_attention(self, attention: AttentionImpl) -> Self {
        Self { attention, ..self }
    }

    /// The kernel policy a job on this device runs with, from `--attention`, the backend and
    /// the environment switches as they are now.
    pub fn kernel_policy(&self) -> KernelPolicy {
        let cubecl = matches!(self.backend, BackendKind::Cuda | BackendKind::Wgpu | BackendKind::Vulkan);
        KernelPolicy::for_backend(self.attention, cubecl, self.backend == BackendKind::Cuda, &Switches::from_env())
    }
}

pub fn compiled_backends() -> Vec<&'static str> {
    let mut v = Vec::new();
    if cfg!(feature = "cuda") {
        v.push("cuda");
    }
    if cfg!(feature = "wgpu") {
        v.push("wgpu");
    }
    if cfg!(feature = "vulkan") {
        v.push("vulkan");
    }
    v.push("cpu");
    v
}

fn cpu_name() -> String {
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    crate::tr!("device.cpu_name", threads = threads)
}

// ---------------------------------------------------------------------------------------------
// CUDA probing: load the driver library ourselves so that a missing driver is a clean "no".
// ---------------------------------------------------------------------------------------------

/// Result of looking for a usable CUDA driver + GPU + NVRTC.
#[derive(Clone, Debug)]
pub struct CudaProbe {
    pub devices: Vec<String>,
    pub problem: Option<String>,
}

const CUDA_DRIVER_NAMES: &[&str] = &["libcuda.so.1", "libcuda.so", "nvcuda.dll"];
const NVRTC_NAMES: &[&str] = &[
    "libnvrtc.so",
    "libnvrtc.so.13",
    "libnvrtc.so.12",
    "libnvrtc.so.11.2",
    "nvrtc64_130_0.dll",
    "nvrtc64_120_0.dll",
];

/// Probe the CUDA driver. Never panics; reports why CUDA is unusable.
pub fn probe_cuda() -> CudaProbe {
    let no = |problem: String| CudaProbe {
        devices: Vec::new(),
        problem: Some(problem),
    };
    // SAFETY: loading a system library by name; its initialisers are the vendor's driver code.
    let lib = CUDA_DRIVER_NAMES
        .iter()
        .find_map(|name| unsafe { libloading::Library::new(name) }.ok());
    let Some(lib) = lib else {
        return no(crate::tr!("device.cuda_no_driver").into());
    };
    type CuInit = unsafe extern "C" fn(u32) -> i32;
    type CuCount = unsafe extern "C" fn(*mut i32) -> i32;
    type CuGet = unsafe extern "C" fn(*mut i32, i32) -> i32;
    type CuName = unsafe extern "C" fn(*mut std::os::raw::c_char, i32, i32) -> i32;
    // SAFETY: the symbols have the documented CUDA driver API signatures.
    let names = unsafe {
        let (Ok(init), Ok(count), Ok(get), Ok(name)) = (
            lib.get::<CuInit>(b"cuInit\0"),
            lib.get::<CuCount>(b"cuDeviceGetCount\0"),
            lib.get::<CuGet>(b"cuDeviceGet\0"),
            lib.get::<CuName>(b"cuDeviceGetName\0"),
        ) else {
            return no(crate::tr!("device.cuda_no_entry_points").into());
        };
        let rc = init(0);
        if rc != 0 {
            return no(crate::tr!("device.cuda_init_failed", code = rc));
        }
        let mut n = 0i32;
        if count(&mut n) != 0 || n <= 0 {
            return no(crate::tr!("device.cuda_no_gpu").into());
        }
        let mut names = Vec::new();
        for i in 0..n {
            let mut dev = 0i32;
            let mut buf = [0 as std::os::raw::c_char; 256];
            if get(&mut dev, i) == 0 && name(buf.as_mut_ptr(), 256, dev) == 0 {
                let s = std::ffi::CStr::from_ptr(buf.as_ptr());
                names.push(s.to_string_lossy().into_owned());
            } else {
                names.push(crate::tr!("device.cuda_device", index = i));
            }
        }
        names
    };
    // NVRTC compiles burn's kernels at run time: without it the first kernel launch would fail.
    // SAFETY: as above.
    let nvrtc = NVRTC_NAMES
        .iter()
        .any(|name| unsafe { libloading::Library::new(name) }.is_ok());
    if !nvrtc {
        return CudaProbe {
            devices: names,
            problem: Some(crate::tr!("device.cuda_no_nvrtc").into()),
        };
    }
    CudaProbe {
        devices: names,
        problem: None,
    }
}

// ---------------------------------------------------------------------------------------------
// wgpu probing
// ---------------------------------------------------------------------------------------------

/// Enumerate wgpu adapters. Returns an error string instead of panicking.
#[cfg(feature = "wgpu")]
pub fn probe_wgpu() -> Result<Vec<AdapterInfo>, String> {
    let result = std::panic::catch_unwind(|| {
        // Only the API burn can use: a default instance also starts the OpenGL/EGL backend,
        // whose display probe makes libwayland print "XDG_RUNTIME_DIR is invalid or not set"
        // on every headless run.
        let instance = wgpu::Instance::new(wgpu::InstanceDescriptor {
            backends: burn_wgpu_backends(),
            ..wgpu::InstanceDescriptor::new_without_display_handle()
        });
        let adapters = pollster::block_on(instance.enumerate_adapters(burn_wgpu_backends()));
        adapters
            .into_iter()
            .map(|a| {
                let info = a.get_info();
                AdapterInfo {
                    software: info.device_type == wgpu::DeviceType::Cpu,
                    name: info.name,
                    backend: format!("{:?}", info.backend).to_lowercase(),
                    device_type: format!("{:?}", info.device_type),
                }
            })
            .collect::<Vec<_>>()
    });
    result.map_err(|_| crate::tr!("device.wgpu_panicked").to_string())
}

/// The graphics APIs burn's `Wgpu` backend (cubecl's `AutoGraphicsApi`) opens: Metal on Apple
/// platforms, Vulkan elsewhere. An adapter of another API (e.g. an OpenGL-only software
/// rasteriser) cannot be used by it and must not be offered.
#[cfg(feature = "wgpu")]
fn burn_wgpu_backends() -> wgpu::Backends {
    if cfg!(any(target_os = "macos", target_os = "ios")) {
        wgpu::Backends::METAL
    } else {
        wgpu::Backends::VULKAN
    }
}

#[cfg(not(feature = "wgpu"))]
pub fn probe_wgpu() -> Result<Vec<AdapterInfo>, String> {
    Err(crate::tr!("device.wgpu_not_compiled").into())
}

/// Probe every compiled backend (for `rfstudio info`).
pub fn probe_all() -> Vec<BackendProbe> {
    let mut out = Vec::new();
    let cuda_compiled = cfg!(feature = "cuda");
    if cuda_compiled {
        let p = probe_cuda();
        out.push(BackendProbe {
            backend: "cuda",
            compiled: true,
            available: p.problem.is_none(),
            detail: match &p.problem {
                None => p.devices.join(", "),
                Some(why) => why.clone(),
            },
        });
    } else {
        out.push(BackendProbe {
            backend: "cuda",
            compiled: false,
            available: false,
            detail: crate::tr!("device.detail_not_compiled", feature = "cuda"),
        });
    }
    let adapters = if cfg!(feature = "wgpu") {
        Some(probe_wgpu())
    } else {
        None
    };
    for (name, filter_vulkan, compiled) in [
        ("wgpu", false, cfg!(feature = "wgpu")),
        ("vulkan", true, cfg!(feature = "vulkan")),
    ] {
        let probe = match (&adapters, compiled) {
            (Some(Ok(list)), true) => {
                let list: Vec<&AdapterInfo> = list
                    .iter()
                    .filter(|a| !filter_vulkan || a.backend == "vulkan")
                    .collect();
                BackendProbe {
                    backend: name,
                    compiled: true,
                    available: !list.is_empty(),
                    detail: if list.is_empty() {
                        crate::tr!("device.no_adapter").into()
                    } else {
                        list.iter()
                            .map(|a| {
                                format!(
                                    "{} [{}{}]",
                                    a.name,
                                    a.backend,
                                    if a.software { crate::tr!("device.detail_software") } else { "" }
                                )
                            })
                            .collect::<Vec<_>>()
                            .join(", ")
                    },
                }
            }
            (Some(Err(e)), true) => BackendProbe {
                backend: name,
                compiled: true,
                available: false,
                detail: e.clone(),
            },
            _ => BackendProbe {
                backend: name,
                compiled: false,
                available: false,
                detail: crate::tr!("device.detail_not_compiled", feature = name),
            },
        };
        out.push(probe);
    }
    out.push(BackendProbe {
        backend: "cpu",
        compiled: true,
        available: true,
        detail: cpu_name(),
    });
    out
}

/// Resolve a `--device` request to a backend that can run here.
pub fn select(request: DeviceRequest) -> Result<Selection, DeviceError> {
    match request {
        DeviceRequest::Cpu => Ok(Selection {
            backend: BackendKind::Cpu,
            attention: AttentionImpl::Auto,
            device_name: cpu_name(),
            notice: crate::tr!("device.notice_cpu_requested").into(),
        }),
        DeviceRequest::Cuda => {
            if !cfg!(feature = "cuda") {
                return Err(DeviceError::NotCompiled("cuda"));
            }
            let p = probe_cuda();
            match p.problem {
                None => Ok(Selection {
                    backend: BackendKind::Cuda,
                    attention: AttentionImpl::Auto,
                    device_name: p.devices.first().cloned().unwrap_or_default(),
                    notice: crate::tr!(
                        "device.notice_cuda",
                        device = p.devices.first().cloned().unwrap_or_default()
                    ),
                }),
                Some(reason) => Err(DeviceError::Unavailable {
                    backend: "cuda",
                    reason,
                }),
            }
        }
        DeviceRequest::Wgpu | DeviceRequest::Vulkan => {
            let (name, kind, vulkan_only) = if request == DeviceRequest::Vulkan {
                ("vulkan", BackendKind::Vulkan, true)
            } else {
                ("wgpu", BackendKind::Wgpu, false)
            };
            let compiled = if vulkan_only {
                cfg!(feature = "vulkan")
            } else {
                cfg!(feature = "wgpu")
            };
            if !compiled {
                return Err(DeviceError::NotCompiled(name));
            }
            let adapters = probe_wgpu().map_err(|reason| DeviceError::Unavailable {
                backend: name,
                reason,
            })?;
            let chosen = adapters
                .iter()
                .filter(|a| !vulkan_only || a.backend == "vulkan")
                .min_by_key(|a| a.software);
            match chosen {
                Some(a) => Ok(Selection {
                    backend: kind,
                    attention: AttentionImpl::Auto,
                    device_name: a.name.clone(),
                    notice: crate::tr!("device.notice_adapter", backend = name, adapter = a.name, api = a.backend),
                }),
                None => Err(DeviceError::Unavailable {
                    backend: name,
                    reason: crate::tr!("device.no_adapter").into(),
                }),
            }
        }
        DeviceRequest::Auto => {
            let mut skipped = Vec::new();
            if cfg!(feature = "cuda") {
                let p = probe_cuda();
                match p.problem {
                    None => {
                        let dev = p.devices.first().cloned().unwrap_or_default();
                        return Ok(Selection {
                            backend: BackendKind::Cuda,
                            attention: AttentionImpl::Auto,
                            notice: crate::tr!("device.notice_cuda_auto", device = dev),
                            device_name: dev,
                        });
                    }
                    Some(why) => skipped.push(format!("cuda: {why}")),
                }
            }
            if cfg!(feature = "wgpu") {
                match probe_wgpu() {
                    Ok(list) => match list.iter().find(|a| !a.software) {
                        Some(a) => {
                            return Ok(Selection {
                                backend: BackendKind::Wgpu,
                                attention: AttentionImpl::Auto,
                                device_name: a.name.clone(),
                                notice: crate::tr!(
                                    "device.notice_wgpu_auto",
                                    adapter = a.name,
                                    api = a.backend
                                ),
                            });
                        }
                        None => skipped.push(crate::tr!("device.skipped_no_hardware_adapter").to_string()),
                    },
                    Err(e) => skipped.push(format!("wgpu: {e}")),
                }
            }
            let why = if skipped.is_empty() {
                crate::tr!("device.no_gpu_backend").to_string()
            } else {
                skipped.join("; ")
            };
            Ok(Selection {
                backend: BackendKind::Cpu,
                attention: AttentionImpl::Auto,
                device_name: cpu_name(),
                notice: crate::tr!("device.notice_cpu_auto", why = why),
            })
        }
    }
}

/// Work that runs on whichever backend was selected. Implemented by commands; `run` is
/// monomorphised once per compiled backend.
pub trait BackendJob {
    type Output;
    fn run<B: Backend>(self, device: B::Device) -> Self::Output;
}

/// Run `f`, turning a panic inside a job or a backend (a bug, a driver that fails while
/// starting, GPU memory running out) into an error instead of aborting the command or leaving a
/// GUI worker silent.
fn guarded<T>(backend: BackendKind, f: impl FnOnce() -> T) -> Result<T, DeviceError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|p| DeviceError::Panicked {
        backend,
        message: panic_message(p.as_ref()),
    })
}

/// Where compiled GPU kernels are cached between runs: `RFSTUDIO_KERNEL_CACHE`, else
/// `$XDG_CACHE_HOME/rfstudio/kernels`, else `~/.cache/rfstudio/kernels`.
pub fn kernel_cache_dir() -> Option<std::path::PathBuf> {
    if let Some(d) = Switches::from_env().kernel_cache {
        return Some(d);
    }
    Some(crate::files::user_cache_dir()?.join("kernels"))
}

/// Set-up shared by the cubecl backends (CUDA, wgpu, Vulkan) before the backend starts: the
/// on-disk kernel cache.
#[cfg(any(feature = "cuda", feature = "wgpu"))]
fn prepare_cubecl() {
    configure_kernel_cache();
}

/// Turn on cubecl's on-disk kernel cache (off by default in cubecl 0.10) and keep its autotune
/// results next to it, so that only the first run on a machine pays for compiling and tuning
/// kernels. Measured on an H100: a fresh process spent minutes compiling (NVRTC) and autotuning
/// SD 1.5's kernels before the first step. A `cubecl.toml` the user wrote still wins, and
/// cubecl's `CUBECL_*` environment variables still apply.
#[cfg(any(feature = "cuda", feature = "wgpu"))]
fn configure_kernel_cache() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        use cubecl::config::cache::CacheConfig;
        use cubecl::config::{CubeClRuntimeConfig, RuntimeConfig};
        let Some(dir) = kernel_cache_dir() else {
            return;
        };
        let user_file = ["cubecl.toml", "CubeCL.toml", "burn.toml", "Burn.toml"].iter().any(|f| {
            std::env::current_dir().is_ok_and(|d| d.ancestors().any(|a| a.join(f).is_file()))
        });
        if user_file {
            tracing::info!("using the cubecl configuration file found above the working directory");
            return;
        }
        if let Err(e) = std::fs::create_dir_all(&dir) {
            tracing::warn!("kernel cache {} unavailable ({e}); kernels are compiled every run", dir.display());
            return;
        }
        let mut config = CubeClRuntimeConfig::default().override_from_env();
        config.compilation.cache = Some(CacheConfig::File(dir.clone()));
        config.autotune.cache = CacheConfig::File(dir.clone());
        // One line per tuned shape (the kernel chosen, the top three times):
        // `RFSTUDIO_AUTOTUNE_LOG=stderr` or a file path. scripts/gpu-bench.sh timestamps stderr,
        // which shows where a first run's minutes go.
        let switches = Switches::from_env();
        match switches.autotune_log {
            Some(v) if v == "stderr" => config.autotune.logger.stderr = true,
            Some(v) => config.autotune.logger.file = Some(v.into()),
            None => {}
        }
        // Every kernel launch with its time (cubecl syncs after each one, so only for finding
        // which kernels dominate): `RFSTUDIO_PROFILE_LOG=file`; scripts/profile_summary.py
        // sums it by kernel. Unlike `CUBECL_DEBUG_LOG`, this leaves out compiled sources.
        if let Some(v) = switches.profile_log {
            config.profiling.logger.level = cubecl::config::profiling::ProfilingLogLevel::Basic;
            config.profiling.logger.file = Some(v.into());
        }
        // `set` panics if cubecl already read its configuration (a backend started earlier in
        // this process); then the earlier configuration simply stays.
        if CubeClRuntimeConfig::storage().lock().is_none() {
            CubeClRuntimeConfig::set(config);
            tracing::info!("GPU kernel cache: {}", dir.display());
        }
    });
}

fn configure<B: Backend>(
    backend: BackendKind,
    device: &B::Device,
    precision: Precision,
) -> Result<(), DeviceError> {
    let dtype = precision.dtype();
    if !B::supports_dtype(device, dtype) {
        return Err(DeviceError::UnsupportedDtype {
            backend,
            device: format!("{device:?}"),
            dtype: precision,
            hint: if precision == Precision::F16 {
                " or `--dtype bf16`"
            } else {
                ""
            },
        });
    }
    let float = match precision {
        Precision::F32 => burn::tensor::FloatDType::F32,
        Precision::F16 => burn::tensor::FloatDType::F16,
        Precision::Bf16 => burn::tensor::FloatDType::BF16,
    };
    match burn::tensor::backend::set_default_float_dtype::<B>(device, float) {
        Ok(()) => Ok(()),
        // Already configured earlier in this process (e.g. a second job on the same device):
        // fine as long as the earlier choice was the same; burn does not let us read it back,
        // so we accept it — the process chooses one precision per device (see NOTES).
        Err(burn::tensor::backend::DeviceError::AlreadyInitialized { .. }) => Ok(()),
        Err(e) => Err(DeviceError::Setup {
            backend,
            reason: e.to_string(),
        }),
    }
}

/// Run `job` on the selected backend with the given precision, under the selection's kernel policy
/// ([`Selection::kernel_policy`]) for the job's duration.
pub fn dispatch<J: BackendJob>(
    selection: &Selection,
    precision: Precision,
    job: J,
) -> Result<J::Output, DeviceError> {
    match selection.backend {
        BackendKind::Cpu => {
            type B = burn::backend::Flex;
            let device = burn::backend::flex::FlexDevice;
            configure::<B>(BackendKind::Cpu, &device, precision)?;
            guarded(BackendKind::Cpu, || policy::scoped(selection.kernel_policy(), || job.run::<B>(device)))
        }
        #[cfg(feature = "cuda")]
        BackendKind::Cuda => {
            type B = burn::backend::Cuda;
            let device = burn::backend::cuda::CudaDevice::default();
            prepare_cubecl();
            guarded(BackendKind::Cuda, || configure::<B>(BackendKind::Cuda, &device, precision))??;
            guarded(BackendKind::Cuda, || policy::scoped(selection.kernel_policy(), || job.run::<B>(device)))
        }
        #[cfg(feature = "wgpu")]
        BackendKind::Wgpu => {
            type B = burn::backend::Wgpu;
            let device = burn::backend::wgpu::WgpuDevice::default();
            prepare_cubecl();
            guarded(BackendKind::Wgpu, || configure::<B>(BackendKind::Wgpu, &device, precision))??;
            guarded(BackendKind::Wgpu, || policy::scoped(selection.kernel_policy(), || job.run::<B>(device)))
        }
        #[cfg(feature = "vulkan")]
        BackendKind::Vulkan => {
            type B = burn::backend::Vulkan;
            let device = burn::backend::wgpu::WgpuDevice::default();
            prepare_cubecl();
            guarded(BackendKind::Vulkan, || configure::<B>(BackendKind::Vulkan, &device, precision))??;
            guarded(BackendKind::Vulkan, || policy::scoped(selection.kernel_policy(), || job.run::<B>(device)))
        }
        #[allow(unreachable_patterns)]
        other => Err(DeviceError::NotCompiled(match other {
            BackendKind::Cuda => "cuda",
            BackendKind::Wgpu => "wgpu",
            BackendKind::Vulkan => "vulkan",
            BackendKind::Cpu => "cpu",
        })),
    }
}

/// A job that runs on several devices at once ([`dispatch_peers`]).
pub trait PeersJob {
    type Output;
    fn run<B: Backend>(self, peers: Peers<B>) -> Self::Output;
}

/// Check that every device of `set` exists and can run, and describe them (the `notice` names
/// the devices and how their sums travel).
pub fn select_set(set: &DeviceSet, attention: AttentionImpl) -> Result<Selection, DeviceError> {
    let bad = |reason: String| DeviceError::PeerDevice {
        set: set.to_string(),
        reason,
    };
    match set.backend {
        BackendKind::Cpu => Ok(Selection {
            backend: BackendKind::Cpu,
            attention,
            device_name: cpu_name(),
            notice: crate::tr!("device.notice_cpu_peers", count = set.len(), cpu = cpu_name()),
        }),
        BackendKind::Cuda => {
            if !cfg!(feature = "cuda") {
                return Err(DeviceError::NotCompiled("cuda"));
            }
            let p = probe_cuda();
            if let Some(reason) = p.problem {
                return Err(DeviceError::Unavailable {
                    backend: "cuda",
                    reason,
                });
            }
            if let Some(&i) = set.indices.iter().find(|&&i| i >= p.devices.len()) {
                return Err(bad(format!(
                    "there is no cuda:{i}; this machine has {} GPU(s) (cuda:0 to cuda:{})",
                    p.devices.len(),
                    p.devices.len().saturating_sub(1)
                )));
            }
            let transport = cuda_transport();
            // cudarc loads NCCL at the first sum; without it that would be a panic mid-run
            let nccl = ["libnccl.so.2", "libnccl.so"]
                .iter()
                // SAFETY: loading a system library by name, as for the CUDA driver above.
                .any(|name| unsafe { libloading::Library::new(name) }.is_ok());
            if !nccl && transport == Transport::Nccl {
                return Err(bad(
                    "NCCL (libnccl.so.2) is not installed, and the GPUs sum gradients through it: install NCCL (NVIDIA's libnccl2 package) or set RFSTUDIO_PEER_SUM=collective".into(),
                ));
            }
            let names: Vec<String> = set.indices.iter().map(|&i| format!("cuda:{i} {}", p.devices[i])).collect();
            Ok(Selection {
                backend: BackendKind::Cuda,
                attention,
                device_name: names.join(", "),
                notice: crate::tr!("device.notice_cuda_peers", count = set.len(), devices = names.join(", "), transport = transport),
            })
        }
        other => Err(bad(format!("data-parallel runs use CUDA GPUs or CPU peers, not {other}"))),
    }
}

/// How CUDA peers sum: NCCL, unless `RFSTUDIO_PEER_SUM=collective` asks for burn-collective.
fn cuda_transport() -> Transport {
    if Switches::from_env().collective_on_cuda { Transport::Collective } else { Transport::Nccl }
}

/// Run `job` on every device of `set` (checked by [`select_set`]) with the given precision.
/// One data-parallel job runs in a process at a time; a second waits for the first.
pub fn dispatch_peers<J: PeersJob>(selection: &Selection, set: &DeviceSet, precision: Precision, job: J) -> Result<J::Output, DeviceError> {
    let _one = peers::ONE_GROUP.lock().unwrap_or_else(|p| p.into_inner());
    let policy = selection.kernel_policy();
    match set.backend {
        BackendKind::Cpu => {
            type B = burn::backend::Flex;
            let device = burn::backend::flex::FlexDevice;
            configure::<B>(BackendKind::Cpu, &device, precision)?;
            // a group left half-registered by a failed earlier job in this process
            burn::collective::reset_collective::<B>();
            let peers = Peers {
                backend: BackendKind::Cpu,
                set: set.clone(),
                devices: vec![device; set.len()],
                ops: peers::collective_ops::<B>(),
                policy,
            };
            guarded(BackendKind::Cpu, || policy::scoped(policy, || job.run::<B>(peers)))
        }
        #[cfg(feature = "cuda")]
        BackendKind::Cuda => {
            type B = burn::backend::Cuda;
            prepare_cubecl();
            let devices: Vec<_> = set.indices.iter().map(|&i| burn::backend::cuda::CudaDevice::new(i)).collect();
            for d in &devices {
                guarded(BackendKind::Cuda, || configure::<B>(BackendKind::Cuda, d, precision))??;
            }
            let ops = match cuda_transport() {
                Transport::Collective => {
                    burn::collective::reset_collective::<B>();
                    peers::collective_ops::<B>()
                }
                Transport::Nccl => nccl::nccl_ops(),
            };
            let peers = Peers {
                backend: BackendKind::Cuda,
                set: set.clone(),
                devices,
                ops,
                policy,
            };
            guarded(BackendKind::Cuda, || policy::scoped(policy, || job.run::<B>(peers)))
        }
        #[allow(unreachable_patterns)]
        other => Err(DeviceError::PeerDevice {
            set: set.to_string(),
            reason: format!("data-parallel runs use CUDA GPUs or CPU peers, not {other}"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_always_selectable() {
        let s = select(DeviceRequest::Cpu).expect("cpu");
        assert_eq!(s.backend, BackendKind::Cpu);
    }

    #[test]
    fn auto_never_panics_and_reports_a_reason() {
        let s = select(DeviceRequest::Auto).expect("auto always resolves");
        assert!(s.notice.starts_with("device: "), "{}", s.notice);
    }

    #[test]
    fn probe_lists_cpu_last_and_available() {
        let probes = probe_all();
        let cpu = probes.last().expect("cpu probe");
        assert_eq!(cpu.backend, "cpu");
        assert!(cpu.available);
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_request_without_feature_is_a_clear_error() {
        let err = select(DeviceRequest::Cuda).unwrap_err().to_string();
        assert!(err.contains("--features cuda"), "{err}");
    }
}
