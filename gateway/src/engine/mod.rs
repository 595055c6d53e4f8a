//! The engine room: every workaround for a limit of Pingora (or of the
//! allocator), and all of the gateway's `unsafe` code, in one place. Each
//! file's header names the upstream change that would let it be deleted.
//!
//! - [`workers`]: share-nothing workers, one thread, runtime and upstream
//!   pool each (Pingora's runtimes share one pool and one listener thread).
//! - [`worker_stream`]: a handed-over client socket moved to its worker's
//!   epoll (one `unsafe` line).
//! - [`upstream_pool`]: idle upstream connections per worker, without a
//!   task per pooled connection.
//! - [`allocator`]: jemalloc with a per-worker cache of Pingora's 64 KiB
//!   body buffers (`unsafe` by nature).
//! - [`log_buffer`]: log lines buffered and flushed by a thread, so the
//!   access log costs no system call per request.
//! - [`listener`]: the limit on open client connections, and the hand-off
//!   of each connection to its worker.

#[cfg(not(target_env = "msvc"))]
pub mod allocator;
pub mod listener;
pub use telemetry::log_buffer;
pub mod upstream_pool;
pub mod worker_stream;
pub mod workers;
