//! CPU-heavy work on the async runtime without stalling the tasks that share its thread.

/// Runs CPU-heavy work without stalling the other tasks of this runtime thread: on a
/// multi-threaded runtime they move to another thread meanwhile (`block_in_place`); a
/// single-threaded runtime (tests) runs it in place.
pub(crate) fn off_the_runtime<T>(work: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(work),
        _ => work(),
    }
}
