//! Share-nothing proxy workers (`work_stealing: false`, the default).
//!
//! Each worker is one thread with its own single-thread runtime and its own
//! [`Gateway`] (so its own upstream connection pool), as nginx's worker
//! processes. The listening service's thread is worker 0: it accepts, and
//! hands each new client connection to the next worker in turn, where the
//! connection stays, request after request, to its end, its socket moved
//! to that worker's epoll ([`super::worker_stream`]). The other workers
//! are Pingora background services that only lend their runtime.
//!
//! With `worker_cpu_affinity: true`, worker `i` is pinned to the `i`-th CPU
//! the process may run on ([`CpuPlan`]), as nginx's `worker_cpu_affinity
//! auto`: worker 0 when it accepts its first connection, the others when
//! their runtime starts. Unpinned, the scheduler now and then puts two
//! workers on one core while the other runs something else, and their
//! connections wait (`bench/notes.md`).
//!
//! Not Pingora's own no-steal runtime (one service over several
//! single-thread runtimes): its connection pool is shared, and pingora-core
//! spawns each idle pooled connection's watch task on a random thread, so
//! about half the requests wake the other thread (`bench/notes.md`).
//!
//! Upstream change that would delete this file: Pingora's no-steal runtime
//! with a connection pool per thread and connections kept on the thread
//! that accepted them (or a listener per thread).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Once, OnceLock};

use async_trait::async_trait;
use pingora::apps::ServerApp;
use pingora::protocols::Stream;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use tokio::runtime::Handle;

use crate::proxy::Gateway;

/// One worker: its app (a [`Gateway`] in the server), and the runtime it
/// runs on once started.
struct Worker<A> {
    app: Arc<A>,
    runtime: OnceLock<Handle>,
}

/// The workers, in the order connections are handed out.
pub struct Workers<A = Gateway> {
    workers: Box<[Worker<A>]>,
    next: AtomicUsize,
    /// Where each worker runs, if pinned.
    cpus: CpuPlan,
    /// Worker 0 (the accepting thread) is pinned at its first connection.
    accepting_thread_pinned: Once,
}

/// The CPU each worker is pinned to (`worker_cpu_affinity`), or none.
#[derive(Debug, Default)]
pub struct CpuPlan {
    /// The CPUs the process may run on, in order; empty: no pinning.
    cpus: Vec<usize>,
}

impl CpuPlan {
    /// No pinning: the scheduler places the workers.
    pub fn none() -> Self {
        CpuPlan::default()
    }

    /// Worker `i` on the `i`-th CPU this process may run on (its affinity
    /// mask as started, so a `taskset` or a cpuset is respected), modulo
    /// their count.
    #[cfg(target_os = "linux")]
    pub fn this_process() -> std::io::Result<Self> {
        use nix::sched::{CpuSet, sched_getaffinity};
        let allowed = sched_getaffinity(nix::unistd::Pid::from_raw(0))?;
        let cpus = (0..CpuSet::count())
            .filter(|&cpu| allowed.is_set(cpu).unwrap_or(false))
            .collect();
        Ok(CpuPlan { cpus })
    }

    /// Pinning is done with Linux's `sched_setaffinity`.
    #[cfg(not(target_os = "linux"))]
    pub fn this_process() -> std::io::Result<Self> {
        Err(std::io::Error::new(
            std::io::ErrorKind::Unsupported,
            "pinning workers to CPUs is only implemented on Linux",
        ))
    }

    /// The CPU of worker `index`, if pinned.
    fn cpu_for(&self, index: usize) -> Option<usize> {
        match self.cpus.len() {
            0 => None,
            n => Some(self.cpus[index % n]),
        }
    }

    /// Pins the calling thread to worker `index`'s CPU, if it has one. A
    /// failure is logged: the worker still serves, unpinned.
    pub fn pin_this_thread(&self, index: usize) {
        let Some(cpu) = self.cpu_for(index) else {
            return;
        };
        match pin_this_thread_to(cpu) {
            Ok(()) => tracing::info!(worker = index, cpu, "worker pinned to its CPU"),
            Err(err) => {
                tracing::warn!(worker = index, cpu, error = %err, "cannot pin worker to its CPU");
            }
        }
    }
}

#[cfg(target_os = "linux")]
fn pin_this_thread_to(cpu: usize) -> std::io::Result<()> {
    let mut only = nix::sched::CpuSet::new();
    only.set(cpu)?;
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &only)?;
    Ok(())
}

/// Not reached: without Linux, no plan has CPUs (`CpuPlan::this_process`).
#[cfg(not(target_os = "linux"))]
fn pin_this_thread_to(_cpu: usize) -> std::io::Result<()> {
    Err(std::io::ErrorKind::Unsupported.into())
}

/// Where a new connection is served.
pub enum Placement<'a, A> {
    /// On the accepting thread, by worker 0's app.
    Here(&'a Arc<A>),
    /// On another worker's thread, by its app.
    There(&'a Handle, &'a Arc<A>),
}

impl<A> Workers<A> {
    /// `apps.len()` workers; the first is the accepting thread's.
    pub fn new(apps: Vec<A>, cpus: CpuPlan) -> Arc<Self> {
        Arc::new(Workers {
            workers: apps
                .into_iter()
                .map(|app| Worker {
                    app: Arc::new(app),
                    runtime: OnceLock::new(),
                })
                .collect(),
            next: AtomicUsize::new(0),
            cpus,
            accepting_thread_pinned: Once::new(),
        })
    }

    pub fn count(&self) -> usize {
        self.workers.len()
    }

    /// The worker for the next connection, round robin. A worker whose
    /// runtime has not started yet is skipped (served here). Called on the
    /// accepting thread only.
    pub fn place(&self) -> Placement<'_, A> {
        self.accepting_thread_pinned
            .call_once(|| self.cpus.pin_this_thread(0));
        let index = match self.workers.len() {
            1 => 0,
            n => self.next.fetch_add(1, Ordering::Relaxed) % n,
        };
        let worker = &self.workers[index];
        match worker.runtime.get() {
            Some(runtime) if index != 0 => Placement::There(runtime, &worker.app),
            _ => Placement::Here(&self.workers[0].app),
        }
    }

    /// The background service that lends worker `index`'s runtime.
    pub fn runtime_lender(self: &Arc<Self>, index: usize) -> RuntimeLender<A> {
        RuntimeLender {
            workers: Arc::clone(self),
            index,
        }
    }
}

impl<A: ServerApp> Workers<A> {
    /// Runs `app` on `stream` and on the same connection's next requests
    /// (what Pingora's accept loop does for a connection it keeps).
    pub async fn serve_connection(app: &Arc<A>, mut stream: Stream, shutdown: &ShutdownWatch) {
        // This thread serves requests: let it keep body buffers.
        #[cfg(not(target_env = "msvc"))]
        super::allocator::enable_on_this_thread();
        while let Some(reused) = app.process_new(stream, shutdown).await {
            stream = reused;
        }
    }
}

/// A Pingora background service of one thread whose runtime serves the
/// connections handed to its worker.
pub struct RuntimeLender<A> {
    workers: Arc<Workers<A>>,
    index: usize,
}

#[async_trait]
impl<A: Send + Sync + 'static> BackgroundService for RuntimeLender<A> {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        // This runs on the one thread of the runtime being lent.
        self.workers.cpus.pin_this_thread(self.index);
        let _ = self.workers.workers[self.index]
            .runtime
            .set(Handle::current());
        // Lend the runtime until the server stops; the connections served
        // on it are tasks of their own.
        while !*shutdown.borrow() {
            if shutdown.changed().await.is_err() {
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn placed(workers: &Workers<usize>) -> (bool, usize) {
        match workers.place() {
            Placement::Here(app) => (true, **app),
            Placement::There(_, app) => (false, **app),
        }
    }

    #[test]
    fn connections_go_round_robin_to_started_workers_only() {
        let workers = Workers::new(vec![0, 1, 2], CpuPlan::none());
        // Nothing started: everything is served where it was accepted.
        for _ in 0..3 {
            assert_eq!(placed(&workers), (true, 0));
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        workers.workers[2]
            .runtime
            .set(runtime.handle().clone())
            .unwrap();
        let turns: Vec<_> = (0..6).map(|_| placed(&workers)).collect();
        assert_eq!(
            turns,
            [
                (true, 0),
                (true, 0), // worker 1 not started
                (false, 2),
                (true, 0),
                (true, 0),
                (false, 2)
            ]
        );
    }

    /// The CPUs `thread` (a task id; 0 for the calling thread) may run on.
    #[cfg(target_os = "linux")]
    fn allowed_cpus(thread: i32) -> Vec<usize> {
        let set = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(thread)).unwrap();
        (0..nix::sched::CpuSet::count())
            .filter(|&cpu| set.is_set(cpu).unwrap())
            .collect()
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn a_plan_pins_worker_i_to_the_ith_allowed_cpu() {
        let plan = CpuPlan::this_process().unwrap();
        let allowed = allowed_cpus(0);
        assert!(!allowed.is_empty());
        let n = allowed.len();
        for index in 0..2 * n {
            assert_eq!(plan.cpu_for(index), Some(allowed[index % n]));
        }
        assert_eq!(CpuPlan::none().cpu_for(0), None);

        // On a fresh thread (this one's affinity stays as it was).
        let last = n - 1;
        let pinned = std::thread::spawn(move || {
            plan.pin_this_thread(last);
            allowed_cpus(0)
        })
        .join()
        .unwrap();
        assert_eq!(pinned, [allowed[last]]);
        assert_eq!(allowed_cpus(0), allowed);
        let unpinned = std::thread::spawn(|| {
            CpuPlan::none().pin_this_thread(0);
            allowed_cpus(0)
        })
        .join()
        .unwrap();
        assert_eq!(unpinned, allowed);
    }

    #[test]
    fn a_lender_lends_its_runtime_until_shutdown() {
        let workers = Workers::new(vec![0, 1], CpuPlan::none());
        let lender = workers.runtime_lender(1);
        let (stop, shutdown) = tokio::sync::watch::channel(false);
        let thread = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap()
                .block_on(lender.start(shutdown));
        });
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while workers.workers[1].runtime.get().is_none() {
            assert!(std::time::Instant::now() < deadline, "never lent");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(matches!(workers.place(), Placement::Here(_)));
        assert!(matches!(workers.place(), Placement::There(..)));
        stop.send(true).unwrap();
        thread.join().unwrap();
    }
}
