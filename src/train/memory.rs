//! Memory sampled while a run trains, recorded with each metrics line: the process's resident
//! memory (Linux `/proc/self/statm`) and, on the cubecl GPU backends, the bytes the device's
//! allocator holds for live tensors (`device::device_memory_in_use`). Anything a platform or
//! backend cannot report is `None`, never an error: memory is shown, not relied on.

use std::path::Path;

/// One sample of the training process's memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemorySample {
    /// Resident set size of the process (Linux only).
    pub resident_bytes: Option<u64>,
    /// Bytes in use by live tensors on the GPU (CUDA and wgpu backends only).
    pub device_bytes: Option<u64>,
}

/// Sample the process's resident memory and, where `device` is a cubecl GPU device, its
/// allocator's bytes in use.
pub fn sample<D: Clone + 'static>(device: &D) -> MemorySample {
    MemorySample {
        resident_bytes: resident_bytes(),
        device_bytes: crate::device::device_memory_in_use(device),
    }
}

/// The process's resident set size: `/proc/self/statm`'s second field (pages) times the page
/// size. `None` off Linux or when /proc is not mounted.
pub fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    resident_from_statm(&statm, page_size()?)
}

fn resident_from_statm(statm: &str, page: u64) -> Option<u64> {
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * page)
}

/// The page size from the process's auxiliary vector (`AT_PAGESZ`), which keeps this free of
/// libc calls and right on kernels with 16 or 64 KiB pages.
fn page_size() -> Option<u64> {
    const AT_PAGESZ: u64 = 6;
    let auxv = std::fs::read(Path::new("/proc/self/auxv")).ok()?;
    let word = std::mem::size_of::<usize>();
    let read = |b: &[u8]| -> u64 {
        let mut buf = [0u8; 8];
        buf[..word].copy_from_slice(b);
        if word == 4 { u32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]) as u64 } else { u64::from_ne_bytes(buf) }
    };
    auxv.chunks_exact(2 * word)
        .map(|pair| (read(&pair[..word]), read(&pair[word..])))
        .find(|&(key, _)| key == AT_PAGESZ)
        .map(|(_, value)| value)
        .filter(|&v| v > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statm_resident_pages_times_page_size() {
        assert_eq!(resident_from_statm("1000 250 30 4 0 60 0\n", 4096), Some(250 * 4096));
        assert_eq!(resident_from_statm("garbage", 4096), None);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn resident_memory_is_sampled_on_linux() {
        let page = page_size().expect("AT_PAGESZ");
        assert!(page.is_power_of_two() && page >= 4096, "{page}");
        let s = sample(&());
        assert!(s.resident_bytes.is_some_and(|b| b > 0), "{s:?}");
        assert_eq!(s.device_bytes, None, "a unit device is no GPU");
    }
}
