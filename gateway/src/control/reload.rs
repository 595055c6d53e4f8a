//! Hot reload: the configuration file is watched and re-applied while the
//! gateway serves; so are the instance sets discovery reports.
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
//!
//! A version is the file *and* the instance sets: a reload whose file is
//! unchanged but whose discovery result changed publishes a new version,
//! one where neither changed is `unchanged`. Between reloads, every change
//! a discovery source pushes is published the same way
//! ([`Reloader::follow_membership`], trigger `discovery`).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use notify::Watcher;

use super::discovery::{Membership, MembershipView};
use super::health::HealthRegistry;
use super::snapshot::{CurrentSnapshot, Snapshot};
use crate::config::{self, Config, ConfigErrors};
use crate::policy::plugins::PluginRegistry;

/// Quiet time after the last file event before reloading: editors write in
/// several steps, and one reload per save is enough.
pub const DEBOUNCE: Duration = Duration::from_millis(100);
/// Longest a burst of events may postpone a reload.
pub const DEBOUNCE_LIMIT: Duration = Duration::from_millis(500);
/// How often the file is compared with what is loaded even without events
/// (bind mounts and network filesystems may send none).
pub const POLL_INTERVAL: Duration = Duration::from_secs(2);
/// Quiet time after a discovery change before publishing: a source that
/// reports several instances one by one makes one version, not several.
pub const MEMBERSHIP_DEBOUNCE: Duration = Duration::from_millis(50);

/// What started a reload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    Start,
    File,
    Signal,
    Admin,
    /// A discovery source reported a changed instance set.
    Discovery,
}

impl Trigger {
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Start => "start",
            Trigger::File => "file",
            Trigger::Signal => "sighup",
            Trigger::Admin => "admin",
            Trigger::Discovery => "discovery",
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
    /// The file and the instance sets say what is already running.
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
    membership: Arc<Membership>,
    plugins: PluginRegistry,
    /// The settings the process was started with (restart-only ones).
    started_with: Config,
    /// One reload at a time.
    running: tokio::sync::Mutex<LoadedBytes>,
    last: Mutex<Option<Attempt>>,
}

/// The bytes of the file last applied, found unchanged, or rejected.
struct LoadedBytes(Option<Vec<u8>>);

impl Reloader {
    pub fn new(
        path: &Path,
        current: Arc<CurrentSnapshot>,
        registry: Arc<HealthRegistry>,
        membership: Arc<Membership>,
        plugins: PluginRegistry,
        loaded_bytes: Option<Vec<u8>>,
    ) -> Self {
        let started_with = current.load().config.clone();
        Self {
            path: path.to_owned(),
            current,
            registry,
            membership,
            plugins,
            started_with,
            running: tokio::sync::Mutex::new(LoadedBytes(loaded_bytes)),
            last: Mutex::new(None),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The discovery sources and their sets.
    pub fn membership(&self) -> &Arc<Membership> {
        &self.membership
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
        let outcome = self.attempt(forced).await;
        // An invalid file is reported once, not again at every poll; a
        // version that could not be built (a name that did not resolve) is
        // tried again.
        if !matches!(outcome, Outcome::Failed(_)) {
            loaded.0 = bytes;
        }
        self.record(trigger, started, &outcome);
        Some(outcome)
    }

    fn record(&self, trigger: Trigger, started: std::time::Instant, outcome: &Outcome) {
        crate::metrics::Metrics::global().reload(match outcome {
            Outcome::Applied { .. } => "applied",
            Outcome::Unchanged { .. } => "unchanged",
            Outcome::Rejected(_) => "rejected",
            Outcome::Failed(_) => "failed",
        });
        let attempt = Attempt {
            at: SystemTime::now(),
            trigger,
            took: started.elapsed(),
            outcome: outcome.clone(),
        };
        log(&attempt);
        *self.last.lock().unwrap_or_else(PoisonError::into_inner) = Some(attempt);
    }

    /// Loads the file; asks discovery for the sets of its services (with
    /// `restart`, every source starts afresh: names are resolved again);
    /// publishes a version if either differs from the running one.
    async fn attempt(&self, restart: bool) -> Outcome {
        let path = self.path.clone();
        let plugins = self.plugins.clone();
        // Loading resolves the listen addresses: blocking work, off the
        // async threads.
        let loaded =
            match tokio::task::spawn_blocking(move || config::load_with(&path, &plugins)).await {
                Ok(loaded) => loaded,
                Err(err) => return Outcome::Failed(format!("loading task failed: {err}")),
            };
        let mut config = match loaded {
            Ok(config) => config,
            Err(errors) => return Outcome::Rejected(errors),
        };
        let running = self.current.load();
        let restart_required = self.keep_restart_only_settings(&mut config);
        let membership = match self.membership.reconcile(&config, restart).await {
            Ok(membership) => membership,
            Err(err) => return Outcome::Failed(err.to_string()),
        };
        if config == running.config && membership == running.membership {
            return Outcome::Unchanged {
                version: running.version,
            };
        }
        match self.publish(config, membership, &running).await {
            Ok(version) => Outcome::Applied {
                version,
                restart_required,
            },
            Err(reason) => Outcome::Failed(reason),
        }
    }

    /// Builds the version after `running` and publishes it once its new
    /// instances had their first check (so a new service or instance does
    /// not start with 503s).
    async fn publish(
        &self,
        config: Config,
        membership: MembershipView,
        running: &Snapshot,
    ) -> Result<u64, String> {
        let version = running.version + 1;
        let snapshot = Snapshot::build(
            config,
            membership,
            version,
            &self.registry,
            &self.plugins,
            Some(running),
        )
        .map_err(|err| err.to_string())?;
        self.registry
            .first_checks_done(first_check_wait(&snapshot.config))
            .await;
        self.current.publish(snapshot);
        Ok(version)
    }

    /// Publishes a version each time a discovery source reports a changed
    /// set (the running configuration, the new sets); runs until the
    /// runtime stops.
    pub fn follow_membership(self: &Arc<Self>, runtime: &tokio::runtime::Handle) {
        let reloader = Arc::clone(self);
        runtime.spawn(async move {
            loop {
                reloader.membership.changed().await;
                tokio::time::sleep(MEMBERSHIP_DEBOUNCE).await;
                reloader.republish().await;
            }
        });
    }

    /// The running configuration on the current instance sets, if they
    /// differ from the running version's.
    pub async fn republish(&self) -> Option<Outcome> {
        let _one_at_a_time = self.running.lock().await;
        let running = self.current.load();
        let mut membership = self.membership.current();
        membership.retain(|service, _| running.config.service(service).is_some());
        if membership == running.membership {
            return None;
        }
        let started = std::time::Instant::now();
        let outcome = match self
            .publish(running.config.clone(), membership, &running)
            .await
        {
            Ok(version) => Outcome::Applied {
                version,
                restart_required: Vec::new(),
            },
            Err(reason) => Outcome::Failed(reason),
        };
        self.record(Trigger::Discovery, started, &outcome);
        Some(outcome)
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
            if attempt.trigger == Trigger::Discovery {
                tracing::info!(
                    trigger,
                    version,
                    took_ms,
                    "instances changed: new version published"
                );
            } else {
                tracing::info!(trigger, version, took_ms, "configuration reloaded");
            }
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
