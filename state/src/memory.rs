//! Makes the stores' memory budget (block cache + write buffers) the process's budget.
//!
//! glibc's malloc serves large allocations with mmap and unmaps them on free, but only
//! below a threshold that it *raises* each time such a block is freed (up to 32 MiB). The
//! stores free large blocks all the time (memtable arenas, compaction buffers), so the
//! threshold climbs, those blocks then come from the heap arenas, and freed memory stays
//! resident as fragmentation. A fixed threshold keeps the resident set near the budget
//! (measured in `bench/RESULTS.md`; jemalloc did worse there).
//!
//! Setting `M_TRIM_THRESHOLD` fixes both thresholds (glibc stops adjusting them), exactly
//! what `MALLOC_TRIM_THRESHOLD_=131072` in the environment does, but without relying on
//! every deployment to set it.

use std::sync::OnceLock;

/// The trim threshold, and with it the fixed mmap threshold: glibc's own starting value.
pub const TRIM_THRESHOLD_BYTES: usize = 128 * 1024;

/// Fixes glibc's trim and mmap thresholds for this process, once; called by the `main` of
/// every binary that holds stores. A no-op on other C libraries. Returns whether the setting is in force.
pub fn bound_heap_retention() -> bool {
    static IN_FORCE: OnceLock<bool> = OnceLock::new();
    *IN_FORCE.get_or_init(|| {
        let applied = apply();
        if applied {
            tracing::info!(
                trim_threshold_bytes = TRIM_THRESHOLD_BYTES,
                "glibc malloc: fixed trim/mmap threshold, freed large blocks go back to the OS"
            );
        } else if cfg!(all(target_os = "linux", target_env = "gnu")) {
            tracing::warn!(
                "glibc malloc refused a fixed trim threshold: resident memory may exceed the \
                 stores' budget; MALLOC_TRIM_THRESHOLD_=131072 in the environment does the same"
            );
        }
        applied
    })
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn apply() -> bool {
    // SAFETY: mallopt only changes malloc's tuning parameters (under malloc's own lock);
    // it takes no pointers and cannot invalidate any allocation.
    unsafe { libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES as libc::c_int) == 1 }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn apply() -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_force_on_glibc() {
        assert_eq!(
            bound_heap_retention(),
            cfg!(all(target_os = "linux", target_env = "gnu"))
        );
        // Idempotent.
        assert_eq!(bound_heap_retention(), bound_heap_retention());
    }
}
