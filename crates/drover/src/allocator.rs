//! The C allocator under RocksDB (the Rust side uses mimalloc, see `main.rs`; RocksDB's C++
//! `new` still goes to glibc malloc).
//!
//! glibc raises its mmap threshold to the size of each large block freed, so after the first
//! memtable flush RocksDB's arena blocks (megabytes each) come from the heap arenas instead of
//! their own mappings, and the memory of flushed memtables stays resident for good. A fixed
//! threshold keeps large blocks in mappings that go back to the system when freed, and a
//! periodic trim hands back the free pages the arenas keep.

// The only unsafe code in the workspace: two libc calls with no pointers involved.
#![allow(unsafe_code)]

/// Large allocations in their own mappings: RocksDB's arena blocks and large reads.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD: libc::c_int = 256 * 1024;

/// Fixes glibc's mmap threshold. Call before threads start.
pub fn tune() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; called before other threads exist.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
    }
}

/// Gives the free pages glibc's arenas hold back to the system (after a flush or a wave).
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim takes the arena locks itself; safe to call from any thread.
    unsafe {
        libc::malloc_trim(0);
    }
}
