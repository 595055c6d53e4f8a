//! Shared building blocks of the three backend services.
//!
//! Layout:
//! - [`error`]: `AppError`, the one type every handler returns on failure, and
//!   the single place that turns a failure into a status code and a
//!   `{"detail": ...}` body.
//! - [`extract`]: `Json`, `Path` and `Query` extractors whose rejections are
//!   `AppError`s (400 for malformed JSON, 422 for invalid fields, 413 for
//!   bodies over the limit) instead of axum's plain-text defaults.
//! - [`money`]: exact money, integer cents inside, a 2-decimal JSON number
//!   outside.
//! - [`db`]: a service's own SQLite file (WAL, busy timeout): its
//!   migrations, run once, safely across processes; reads on the caller's
//!   thread, writes grouped on one writer thread.
//! - [`serve`]: binding, graceful shutdown on SIGTERM/Ctrl-C, the common
//!   router layers, logging set-up and the `/health` handler.
//! - [`access_log`]: the line each request leaves in the log.
//! - [`events`]: the transactional outbox, its relay to NATS JetStream, and
//!   event consumers that apply each event once.
//! - [`fault`]: the crash tests' fault injection.
//! - [`metrics`]: the service's Prometheus metrics (`GET /metrics`).
//! - [`registration`]: `--registry`/`--advertise`, and keeping the
//!   instance registered in etcd while it serves.
//! - [`trace`]: the request id and trace context work carries, and passes
//!   on to the services it calls.
//! - [`testing`]: calling a router in-process from tests.

pub mod access_log;
#[cfg(feature = "contract")]
pub mod contract;
pub mod db;
pub mod error;
pub mod events;
pub mod extract;
pub mod fault;
pub mod metrics;
pub mod money;
pub mod number;
pub mod openapi;
pub mod page;
pub mod registration;
pub mod serve;
pub mod testing;
pub mod trace;

pub use error::{AppError, AppResult};

/// The allocator each service binary declares (`#[global_allocator]`):
/// jemalloc, whose thread caches serve the many small allocations of a
/// request (headers, JSON, rows) with less work than glibc's malloc, and
/// whose background thread returns unused pages outside the request path
/// (measured in `bench/notes.md`, "The services").
pub use tikv_jemallocator::Jemalloc;
