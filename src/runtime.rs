//! Running on this machine: the device, how many threads libtorch gets, and batches prepared on
//! other cores while the model works on the current one.

use anyhow::Result;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;

/// Cores not busy with other processes, over 200 ms from now; all cores when that cannot be
/// read.
pub fn free_cores() -> usize {
    let Some(start) = CpuReading::now() else {
        return cores();
    };
    std::thread::sleep(std::time::Duration::from_millis(200));
    start.free_cores_since().unwrap_or_else(cores)
}

/// The threads an engine runs on: what [`configure_threads`] gave, else every core.
pub fn threads() -> usize {
    match THREADS.load(Ordering::Relaxed) {
        0 => cores(),
        n => n,
    }
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The machine's CPU time (`/proc/stat`) and this process's at one moment: from it, the cores
/// other processes left free over any span that follows, this process's own threads not
/// counted as load.
pub struct CpuReading {
    total: u64,
    idle: u64,
    own: u64,
}

impl CpuReading {
    /// `None` where `/proc` cannot be read.
    pub fn now() -> Option<Self> {
        let text = std::fs::read_to_string("/proc/stat").ok()?;
        let v: Vec<u64> = text
            .lines()
            .next()?
            .split_whitespace()
            .skip(1)
            .filter_map(|x| x.parse().ok())
            .collect();
        Some(CpuReading {
            total: v.iter().sum(),
            idle: v.get(3)? + v.get(4).unwrap_or(&0),
            own: own_cpu_ticks()?,
        })
    }

    /// The cores other processes left free since this reading, on average (at least one).
    pub fn free_cores_since(&self) -> Option<usize> {
        let now = CpuReading::now()?;
        Some(free_of(
            cores(),
            now.total.saturating_sub(self.total),
            now.idle.saturating_sub(self.idle),
            now.own.saturating_sub(self.own),
        ))
    }
}

/// The cores of `cores` free of other processes, from the ticks that passed on all of them
/// (`total`), idle, and spent by this process (at least one).
fn free_of(cores: usize, total: u64, idle: u64, own: u64) -> usize {
    let others = total.saturating_sub(idle).saturating_sub(own) as f64 / total.max(1) as f64;
    let free = cores as f64 - (others * cores as f64).round();
    (free.max(0.0) as usize).clamp(1, cores)
}

/// This process's user and system time in clock ticks (`/proc/self/stat` fields 14 and 15, the
/// unit of `/proc/stat`).
fn own_cpu_ticks() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name (field 2) may hold spaces; the fields after it start past its `)`.
    let rest = &text[text.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11);
    Some(fields.next()?.parse::<u64>().ok()? + fields.next()?.parse::<u64>().ok()?)
}

/// The threads [`configure_threads`] last gave; 0 before it is called.
static THREADS: AtomicUsize = AtomicUsize::new(0);

/// Give libtorch `requested` threads, or the free cores; returns the count, which engines
/// started later (onnxruntime's sessions) take too ([`threads`]). libtorch's OpenMP threads
/// slow down sharply when they outnumber the cores that are free. Safe to call again at any
/// time: libtorch takes its inter-op thread count only once, before any work.
pub fn configure_threads(requested: Option<usize>) -> usize {
    let n = requested.unwrap_or_else(free_cores).max(1);
    THREADS.store(n, Ordering::Relaxed);
    #[cfg(feature = "torch")]
    {
        tch::set_num_threads(n as i32);
        if tch::get_num_interop_threads() != 1 {
            tch::set_num_interop_threads(1);
        }
    }
    n
}

/// Make glibc keep the memory that libtorch frees for the next tensors instead of handing it
/// back to the kernel. By default a block over 32 MB (an activation of a batch) is a fresh
/// `mmap` and the top of the heap is trimmed, so each forward pass page-faults its activations
/// in again and the kernel zeroes them: over a third of the CPU time of EfficientNet-Lite0
/// inference at batch 16. Blocks up to 1 GB now come from the heap, which keeps up to 1 GB
/// free at its top. The binaries call it first thing; without glibc it does nothing.
pub fn reuse_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        const KEEP: libc::c_int = 1 << 30;
        // SAFETY: mallopt only sets allocator parameters; it is safe to call at any time.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, KEEP);
            libc::mallopt(libc::M_TRIM_THRESHOLD, KEEP);
        }
    }
}

/// Run `consume` on items `0..count` in order while a second thread prepares the next items
/// with `make` (which may use rayon); at most `ahead` items wait. The first error stops both.
pub fn prefetched<T, M, C>(count: usize, ahead: usize, make: M, mut consume: C) -> Result<()>
where
    T: Send,
    M: Fn(usize) -> Result<T> + Sync,
    C: FnMut(usize, T) -> Result<()>,
{
    std::thread::scope(|scope| {
        let (tx, rx) = mpsc::sync_channel::<Result<T>>(ahead.max(1));
        let make = &make;
        scope.spawn(move || {
            for i in 0..count {
                let item = make(i);
                let failed = item.is_err();
                if tx.send(item).is_err() || failed {
                    break;
                }
            }
        });
        for i in 0..count {
            let item = rx
                .recv()
                .map_err(|_| anyhow::anyhow!("the batch producer stopped"))??;
            consume(i, item)?;
        }
        Ok(())
    })
}

/// Where models run: the GPU when built with the `cuda` feature and libtorch finds one, else
#[cfg(feature = "torch")]
/// the CPU.
pub fn device() -> tch::Device {
    if cfg!(feature = "cuda") {
        tch::Device::cuda_if_available()
    } else {
        tch::Device::Cpu
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefetched_items_arrive_in_order() {
        let mut seen = Vec::new();
        prefetched(
            20,
            2,
            |i| Ok(i * i),
            |i, v| {
                seen.push((i, v));
                Ok(())
            },
        )
        .unwrap();
        assert_eq!(seen, (0..20).map(|i| (i, i * i)).collect::<Vec<_>>());
    }

    #[test]
    fn an_error_on_either_side_stops_the_run() {
        let err = prefetched(
            10,
            2,
            |i| {
                if i == 3 {
                    anyhow::bail!("bad image {i}")
                } else {
                    Ok(i)
                }
            },
            |_, _| Ok(()),
        );
        assert_eq!(err.unwrap_err().to_string(), "bad image 3");
        let err = prefetched(10, 2, Ok, |i, _| {
            if i == 5 {
                anyhow::bail!("stop")
            } else {
                Ok(())
            }
        });
        assert_eq!(err.unwrap_err().to_string(), "stop");
    }

    #[cfg(feature = "torch")]
    #[test]
    fn threads_can_be_set_again_after_work_has_run() {
        configure_threads(Some(1));
        let x = tch::Tensor::ones([64, 64], (tch::Kind::Float, tch::Device::Cpu));
        let _ = x.matmul(&x).sum(tch::Kind::Float).double_value(&[]);
        assert_eq!(configure_threads(Some(2)), 2);
        assert_eq!(tch::get_num_threads(), 2);
        assert_eq!(tch::get_num_interop_threads(), 1);
    }

    #[test]
    fn free_cores_leave_out_this_process() {
        // 2 cores over 1 s (200 ticks): busy with this process only, half with another job,
        // all with others, idle.
        assert_eq!(free_of(2, 200, 20, 180), 2);
        assert_eq!(free_of(2, 200, 0, 100), 1);
        assert_eq!(free_of(2, 200, 0, 0), 1);
        assert_eq!(free_of(2, 200, 200, 0), 2);
        // 16 cores, a quarter busy with others: 12 free; no time passed: all.
        assert_eq!(free_of(16, 1600, 1000, 200), 12);
        assert_eq!(free_of(4, 0, 0, 0), 4);
    }

    #[test]
    fn free_cores_is_within_the_machine() {
        let n = free_cores();
        assert!(n >= 1 && n <= std::thread::available_parallelism().unwrap().get());
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn own_cpu_time_is_the_process_user_and_system_ticks() {
        let spin = std::time::Instant::now();
        let mut x = 0u64;
        while spin.elapsed() < std::time::Duration::from_millis(150) {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
        }
        // times(2) reports the same counts in the same unit.
        let mut tms = libc::tms {
            tms_utime: 0,
            tms_stime: 0,
            tms_cutime: 0,
            tms_cstime: 0,
        };
        // SAFETY: times only writes the struct it is given.
        unsafe { libc::times(&mut tms) };
        let ours = own_cpu_ticks().unwrap();
        let theirs = (tms.tms_utime + tms.tms_stime) as u64;
        assert!(ours > 0, "150 ms of spinning read as no time");
        assert!(
            ours.abs_diff(theirs) <= 2,
            "{ours} ticks, times(2) {theirs}"
        );
    }
}
