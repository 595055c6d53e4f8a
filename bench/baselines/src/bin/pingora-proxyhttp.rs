//! Stock pingora-proxy `ProxyHttp`: every default, one upstream.

use async_trait::async_trait;
use bench_baselines::{Cli, server};
use clap::Parser;
use pingora::prelude::{HttpPeer, ProxyHttp, Result, Session};

struct Naive {
    upstream: String,
}

#[async_trait]
impl ProxyHttp for Naive {
    type CTX = ();

    fn new_ctx(&self) {}

    async fn upstream_peer(&self, _session: &mut Session, _ctx: &mut ()) -> Result<Box<HttpPeer>> {
        Ok(Box::new(HttpPeer::new(
            self.upstream.as_str(),
            false,
            String::new(),
        )))
    }
}

fn main() {
    let cli = Cli::parse();
    let mut server = server(&cli);
    let mut service = pingora::proxy::http_proxy_service(
        &server.configuration,
        Naive {
            upstream: cli.upstream.clone(),
        },
    );
    service.add_tcp(&cli.listen);
    server.add_service(service);
    server.run_forever();
}
