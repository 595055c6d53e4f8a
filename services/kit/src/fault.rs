//! Fault injection for the crash tests: `SERVICE_FAULT_EXIT_AFTER=<step>`
//! makes the process exit at once, as if killed, right after that step
//! (`pending`, `reserved`, `confirmed`, `published`, ...). Read only by
//! tests; unset, every call is one relaxed load of a cached `None`.

use std::sync::OnceLock;

/// The environment variable the crash tests set.
pub const VARIABLE: &str = "SERVICE_FAULT_EXIT_AFTER";

/// Exits the process (status 86) if the tests asked for a crash after
/// `step`. Nothing is flushed or shut down: committed data is all there is.
pub fn exit_after(step: &str) {
    static STEP: OnceLock<Option<String>> = OnceLock::new();
    if STEP.get_or_init(|| std::env::var(VARIABLE).ok()).as_deref() == Some(step) {
        eprintln!("fault injection: exiting after {step}");
        std::process::exit(86);
    }
}
