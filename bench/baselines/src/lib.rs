//! Two reference proxies for `bench/`, each forwarding everything to one
//! upstream with keep-alive, on the same Pingora version as the gateway:
//!
//! - `pingora-proxyhttp`: the stock way, pingora-proxy's `ProxyHttp` with
//!   only `upstream_peer` implemented (the "naive Pingora proxy" the
//!   gateway is measured against).
//! - `pingora-bare`: pingora-core's HTTP/1 sessions and connection pool
//!   with nothing on top: no routing, checks, headers, logging or
//!   timeouts. The floor of any proxy built on Pingora's protocol layer.
//!
//! They show where a proxied request's CPU goes: protocol layer, framework,
//! features (see `bench/notes.md`).

use clap::Parser;
use pingora::server::Server;
use pingora::server::configuration::ServerConf;

/// Command line shared by both proxies.
#[derive(Debug, Parser)]
pub struct Cli {
    /// Address to listen on.
    #[arg(long)]
    pub listen: String,
    /// The one upstream, host:port.
    #[arg(long)]
    pub upstream: String,
    /// Worker threads.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Pingora's work stealing (off: one runtime per thread).
    #[arg(long)]
    pub work_stealing: bool,
}

/// A Pingora server configured from the command line.
pub fn server(cli: &Cli) -> Server {
    let conf = ServerConf {
        threads: cli.threads,
        work_stealing: cli.work_stealing,
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    server
}
