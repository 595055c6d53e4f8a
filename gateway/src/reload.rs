//! Hot reload: the configuration file is watched and re-applied while the
//! gateway serves.
//!
//! Triggers: a change in the file's directory (inotify through `notify`,
//! which sees in-place writes, editors' write-and-rename and Kubernetes'
//! symlink swaps alike), a slow poll as a safety net for filesystems that
//! send no events, SIGHUP, and `POST /admin/reload`. Bursts of events are
//! debounced, and a file whose bytes did not change is not reloaded.
//!
//! A reload runs on the control runtime, never on the request path: read,
//! parse and validate the whole file exactly as `gateway check` does; on
//! any error change nothing (the running version keeps serving) and record
//! the error with its line and column; otherwise build the new
//! [`Snapshot`], give its new instances their first health check, and
//! publish it in one atomic swap. Requests already running finish on the
//! version they started with. Settings that need a restart (the listen
//! addresses, the thread count and mode, the shutdown grace) are reported,
//! not silently ignored.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use notify::Watcher;

use crate::config::{self, Config, ConfigErrors};
use crate::health::HealthRegistry;
use crate::snapshot::{CurrentSnapshot, Snapshot};

/// Quiet time after the last file event before reloading: editors write in
/// several steps, and one reload per save is enough.
pub const DEBOUNCE: Duration = Duration::from_millis(100);
/// Longest a burst of events may postpone a reload.
pub const DEBOUNCE_LIMIT: Duration = Duration::from_millis(500);
/// How often the file is compared with what is loaded even without events
/// (bind mounts and network filesystems may send none).
pub const POLL_INTERVAL: Duration = Duration::from_secs(2);

/// What started a reload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    Start,
    File,
    Signal,
    Admin,
}

impl Trigger {
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Start => "start",
            Trigger::File => "file",
            Trigger::Signal => "sighup",
            Trigger::Admin => "admin",
        }
    }
}

/// How a reload attempt ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The new version is serving.
    Applied {
        version: u64,
        /// Edited settings that only a restart applies.
        restart_required: Vec<String>,
    },
    /// The file says what is already running.
    Unchanged { version: u64 },
    /// The file is invalid; the running version keeps serving.
    Rejected(ConfigErrors),
    /// The file is valid but the version could not be built.
    Failed(String),
}

#[derive(Debug, Clone)]
pub struct Attempt {
    pub at: SystemTime,
    pub trigger: Trigger,
    pub took: Duration,
    pub outcome: Outcome,
}

/// Reloads and remembers how the last one went.
pub struct Reloader {
    path: PathBuf,
    current: Arc<CurrentSnapshot>,
    registry: Arc<HealthRegistry>,
    /// The settings the process was started with (restart-only ones).
    started_with: Config,
    /// One reload at a time.
    running: tokio::sync::Mutex<LoadedBytes>,
    last: Mutex<Option<Attempt>>,
}

/// The bytes of the file the running version came from.
struct LoadedBytes(Option<Vec<u8>>);

impl Reloader {
    pub fn new(
        path: &Path,
        current: Arc<CurrentSnapshot>,
        registry: Arc<HealthRegistry>,
        loaded_bytes: Option<Vec<u8>>,
    ) -> Self {
        let started_with = current.load().config.clone();
        Self {
            path: path.to_owned(),
            current,
            registry,
            started_with,
            running: tokio::sync::Mutex::new(LoadedBytes(loaded_bytes)),
            last: Mutex::new(None),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn current(&self) -> &CurrentSnapshot {
        &self.current
    }

    /// The last reload attempt, if any.
    pub fn last_attempt(&self) -> Option<Attempt> {
        self.last
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Reloads if the file's bytes differ from the running version's (or
    /// always, for SIGHUP and the admin endpoint). Returns `None` when the
    /// file had not changed and nothing was attempted.
    pub async fn reload(&self, trigger: Trigger) -> Option<Outcome> {
        let mut loaded = self.running.lock().await;
        let bytes = tokio::fs::read(&self.path).await.ok();
        let forced = matches!(trigger, Trigger::Signal | Trigger::Admin);
        if !forced && bytes.is_some() && bytes == loaded.0 {
            return None;
        }
        let started = std::time::Instant::now();
        let outcome = self.attempt().await;
        if matches!(outcome, Outcome::Applied { .. } | Outcome::Unchanged { .. }) {
            loaded.0 = bytes;
        }
        let attempt = Attempt {
            at: SystemTime::now(),
            trigger,
            took: started.elapsed(),
            outcome: outcome.clone(),
        };
        log(&attempt);
        *self.last.lock().unwrap_or_else(PoisonError::into_inner) = Some(attempt);
        Some(outcome)
    }

    async fn attempt(&self) -> Outcome {
        let path = self.path.clone();
        // Loading resolves host names: blocking work, off the async threads.
        let loaded = match tokio::task::spawn_blocking(move || config::load(&path)).await {
            Ok(loaded) => loaded,
            Err(err) => return Outcome::Failed(format!("loading task failed: {err}")),
        };
        let mut config = match loaded {
            Ok(config) => config,
            Err(errors) => return Outcome::Rejected(errors),
        };
        let running = self.current.load();
        let restart_required = self.keep_restart_only_settings(&mut config);
        if config == running.config {
            return Outcome::Unchanged {
                version: running.version,
            };
        }
        let version = running.version + 1;
        let snapshot = match Snapshot::build(config, version, &self.registry).await {
            Ok(snapshot) => snapshot,
            Err(err) => return Outcome::Failed(err.to_string()),
        };
        // New instances get their first check before the version goes live,
        // so a route to a new service does not start with 503s.
        self.registry
            .first_checks_done(first_check_wait(&snapshot.config))
            .await;
        self.current.publish(snapshot);
        Outcome::Applied {
            version,
            restart_required,
        }
    }

    /// Puts back the settings a running process cannot change, and says
    /// which ones the file changed.
    fn keep_restart_only_settings(&self, config: &mut Config) -> Vec<String> {
        fn keep<T: PartialEq + Copy + std::fmt::Debug>(
            name: &str,
            running: T,
            new: &mut T,
            notes: &mut Vec<String>,
        ) {
            if *new != running {
                notes.push(format!("{name}: {running:?} → {new:?} (still {running:?})"));
                *new = running;
            }
        }
        let running = &self.started_with;
        let mut notes = Vec::new();
        keep("listen", running.listen, &mut config.listen, &mut notes);
        keep(
            "admin_listen",
            running.admin_listen,
            &mut config.admin_listen,
            &mut notes,
        );
        keep(
            "shutdown_grace",
            running.shutdown_grace,
            &mut config.shutdown_grace,
            &mut notes,
        );
        keep(
            "work_stealing",
            running.work_stealing,
            &mut config.work_stealing,
            &mut notes,
        );
        keep(
            "worker_cpu_affinity",
            running.worker_cpu_affinity,
            &mut config.worker_cpu_affinity,
            &mut notes,
        );
        keep("threads", running.threads, &mut config.threads, &mut notes);
        notes
    }

    /// Watches the file (through its directory), polls it, and listens for
    /// SIGHUP, reloading on each; runs until the runtime stops.
    pub fn spawn_triggers(
        self: &Arc<Self>,
        runtime: &tokio::runtime::Handle,
    ) -> notify::Result<()> {
        let (events_tx, mut events_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
        let file_name = self.path.file_name().map(ToOwned::to_owned);
        let via_symlink =
            std::fs::symlink_metadata(&self.path).is_ok_and(|m| m.file_type().is_symlink());
        let watched_name = file_name.clone();
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                // Events about the file itself, or any event if the file is a
                // symlink (Kubernetes swaps a `..data` link beside it); other
                // files in the directory (a log file, say) do not count. The
                // byte comparison in `reload` has the last word.
                let Ok(event) = event else { return };
                let concerns_file = via_symlink
                    || event.paths.iter().any(|path| {
                        let name = path.file_name();
                        name == watched_name.as_deref()
                            || name.is_some_and(|n| n.to_string_lossy().starts_with(".."))
                    });
                if concerns_file {
                    let _ = events_tx.send(());
                }
            })?;
        let directory = match self.path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir.to_owned(),
            _ => PathBuf::from("."),
        };
        watcher.watch(&directory, notify::RecursiveMode::NonRecursive)?;
        tracing::info!(file = %self.path.display(), ?file_name, "watching the configuration for changes");

        let reloader = Arc::clone(self);
        runtime.spawn(async move {
            let _watcher = watcher; // dropping it stops the events
            let mut poll = tokio::time::interval(POLL_INTERVAL);
            poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    event = events_rx.recv() => {
                        if event.is_none() {
                            return;
                        }
                        // Debounce: wait until the file is quiet, but never
                        // longer than DEBOUNCE_LIMIT.
                        let limit = tokio::time::Instant::now() + DEBOUNCE_LIMIT;
                        while tokio::time::Instant::now() < limit {
                            match tokio::time::timeout(DEBOUNCE, events_rx.recv()).await {
                                Ok(Some(())) => continue,
                                _ => break,
                            }
                        }
                    }
                    _ = poll.tick() => {}
                }
                reloader.reload(Trigger::File).await;
            }
        });

        #[cfg(unix)]
        {
            let reloader = Arc::clone(self);
            let mut hangup = {
                let _guard = runtime.enter();
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).map_err(
                    |err| notify::Error::generic(&format!("cannot listen for SIGHUP: {err}")),
                )?
            };
            runtime.spawn(async move {
                while hangup.recv().await.is_some() {
                    tracing::info!("SIGHUP: reloading the configuration");
                    reloader.reload(Trigger::Signal).await;
                }
            });
        }
        Ok(())
    }
}

/// How long a version may wait for its new instances' first checks.
pub fn first_check_wait(config: &Config) -> Duration {
    config
        .services
        .iter()
        .map(|s| s.health.timeout)
        .max()
        .unwrap_or_default()
        + Duration::from_millis(200)
}

fn log(attempt: &Attempt) {
    let trigger = attempt.trigger.as_str();
    let took_ms = attempt.took.as_millis() as u64;
    match &attempt.outcome {
        Outcome::Applied {
            version,
            restart_required,
        } => {
            tracing::info!(trigger, version, took_ms, "configuration reloaded");
            for note in restart_required {
                tracing::warn!(trigger, version, "needs a restart to take effect: {note}");
            }
        }
        Outcome::Unchanged { version } => {
            tracing::info!(trigger, version, "configuration unchanged");
        }
        Outcome::Rejected(errors) => {
            for line in errors.to_string().lines() {
                tracing::error!(
                    trigger,
                    "configuration rejected, previous version keeps serving: {line}"
                );
            }
        }
        Outcome::Failed(reason) => {
            tracing::error!(trigger, %reason, "configuration could not be applied, previous version keeps serving");
        }
    }
}
