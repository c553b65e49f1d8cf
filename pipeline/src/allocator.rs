//! Process-wide allocator settings, applied once at start.
//!
//! glibc's malloc serves allocations above its mmap threshold with their own
//! mappings, returned to the system on free. The threshold starts at 128 KiB
//! but rises (up to 32 MiB) each time such a block is freed, after which
//! the column buffers of every micro-batch (tens of MiB, grown by doubling)
//! come from the heap arenas, where freed space stays resident and
//! fragmented. A fixed threshold keeps the large ones in their own mappings:
//! measured (docs/performance.md) peak RSS per million buffered events fell
//! from 354 MB to 194 MB.
//!
//! Fixing the mmap threshold also fixes the trim threshold, at 128 KiB: the
//! arenas then hand freed memory back to the kernel after almost every batch,
//! and the next batch page-faults it in again (about 7% of the CPU). So the
//! trim threshold is raised, and the mmap threshold is 4 MiB rather than
//! 1 MiB: `tally replay` of the core-path file (5 M events, 200,000-event
//! batches), four runs each, alternating: 5.43-5.54 CPU-s before, 4.89-5.06
//! after (−8%), 190 → 222-255 MB peak RSS, and 199 MB per million buffered
//! events (docs/performance.md, round 10).

/// Buffers above this size go to their own mappings.
const MMAP_THRESHOLD: i32 = 4 << 20;
/// Free memory at the top of an arena kept for the next batch, up to this.
const TRIM_THRESHOLD: i32 = 64 << 20;

/// Apply the settings. Call before any threads start.
#[allow(unsafe_code)]
pub fn tune() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // glibc's own environment settings, when given, win.
        for (env, param, value) in [
            (
                "MALLOC_MMAP_THRESHOLD_",
                libc::M_MMAP_THRESHOLD,
                MMAP_THRESHOLD,
            ),
            (
                "MALLOC_TRIM_THRESHOLD_",
                libc::M_TRIM_THRESHOLD,
                TRIM_THRESHOLD,
            ),
        ] {
            if std::env::var_os(env).is_some() {
                continue;
            }
            // SAFETY: mallopt only sets a malloc parameter; both take any
            // value in range here and return 0 on a rejected one, which
            // leaves glibc's default in place.
            let ok = unsafe { libc::mallopt(param, value) };
            if ok == 0 {
                eprintln!(
                    "warning: could not set {env} for malloc; peak memory or CPU may be higher"
                );
            }
        }
    }
}
