//! Graceful shutdown and hand-over.
//!
//! Pingora handles the signals: SIGTERM stops the listeners, SIGQUIT first
//! hands the listening sockets to a new process started with `--upgrade`
//! (zero-downtime binary upgrade) and stops its listeners 5 s later, SIGINT
//! exits at once. After SIGTERM/SIGQUIT Pingora then sleeps for the whole
//! grace period, busy or not. This module makes the wait end when the work
//! does: it counts the requests in flight and exits the process as soon as
//! none is left (or when `shutdown_grace` is over).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

/// Requests between header and last byte, process-wide.
static IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);
/// Set once a shutdown or hand-over started: answers then say
/// `Connection: close`, so clients move to fresh connections (served by the
/// new process, or refused and retried) instead of reusing one that is
/// about to be closed under them.
static DRAINING: AtomicBool = AtomicBool::new(false);

/// Pingora keeps accepting for this long after SIGQUIT, so the new process
/// and the old one overlap (its `CLOSE_TIMEOUT`).
const UPGRADE_OVERLAP: Duration = Duration::from_secs(5);
/// How often the drain is checked.
const DRAIN_POLL: Duration = Duration::from_millis(50);

/// Counts one request for as long as it lives.
#[derive(Debug)]
pub struct InFlight(());

impl InFlight {
    pub fn start() -> Self {
        IN_FLIGHT.fetch_add(1, Ordering::Relaxed);
        InFlight(())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        IN_FLIGHT.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Whether the process is shutting down or handing over.
pub fn draining() -> bool {
    DRAINING.load(Ordering::Relaxed)
}

/// Requests in flight now.
pub fn in_flight() -> usize {
    IN_FLIGHT.load(Ordering::Relaxed)
}

/// Watches SIGTERM and SIGQUIT on `runtime`; after one, waits until no
/// request is in flight (twice in a row, [`DRAIN_POLL`] apart) or `grace`
/// has passed, then exits the process.
pub fn spawn_drain_watch(runtime: &tokio::runtime::Handle, grace: Duration) -> std::io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let _guard = runtime.enter();
    let mut terminate = signal(SignalKind::terminate())?;
    let mut quit = signal(SignalKind::quit())?;
    runtime.spawn(async move {
        let upgrade = tokio::select! {
            _ = terminate.recv() => false,
            _ = quit.recv() => true,
        };
        DRAINING.store(true, Ordering::Relaxed);
        if upgrade {
            tracing::info!("SIGQUIT: handing the listeners to the new process");
            tokio::time::sleep(UPGRADE_OVERLAP + DRAIN_POLL).await;
        }
        tracing::info!(
            in_flight = in_flight(),
            ?grace,
            "shutting down: no new connections, finishing requests in flight"
        );
        let deadline = tokio::time::Instant::now() + grace;
        let mut idle_checks = 0;
        while tokio::time::Instant::now() < deadline {
            idle_checks = if in_flight() == 0 { idle_checks + 1 } else { 0 };
            if idle_checks >= 2 {
                tracing::info!("all requests finished: exiting");
                crate::flush_logs();
                telemetry::export::shutdown();
                std::process::exit(0);
            }
            tokio::time::sleep(DRAIN_POLL).await;
        }
        tracing::warn!(
            in_flight = in_flight(),
            "grace period over: exiting with requests still in flight"
        );
        crate::flush_logs();
        telemetry::export::shutdown();
        std::process::exit(0);
    });
    Ok(())
}
