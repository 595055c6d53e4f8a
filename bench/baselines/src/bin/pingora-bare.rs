//! pingora-core's HTTP/1 sessions and pool, nothing on top.

use std::sync::Arc;

use async_trait::async_trait;
use bench_baselines::{Cli, server};
use clap::Parser;
use pingora::apps::{HttpPersistentSettings, HttpServerApp, ReusedHttpStream};
use pingora::connectors::http::v1::Connector;
use pingora::prelude::HttpPeer;
use pingora::protocols::http::ServerSession;
use pingora::server::ShutdownWatch;

struct Bare {
    connector: Connector,
    peer: HttpPeer,
}

#[async_trait]
impl HttpServerApp for Bare {
    async fn process_new_http(
        self: &Arc<Self>,
        mut session: ServerSession,
        _shutdown: &ShutdownWatch,
    ) -> Option<ReusedHttpStream> {
        if !session.read_request().await.ok()? {
            return None;
        }
        let (mut upstream, _reused) = self.connector.get_http_session(&self.peer).await.ok()?;
        let request = Box::new(session.req_header().clone());
        upstream.write_request_header(request).await.ok()?;
        while let Some(chunk) = session.read_request_body().await.ok()? {
            upstream.write_body(&chunk).await.ok()?;
        }
        upstream.finish_body().await.ok()?;
        upstream.read_response().await.ok()?;
        let response = Box::new(upstream.resp_header()?.clone());
        session.write_response_header(response).await.ok()?;
        while let Some(chunk) = upstream.read_body_bytes().await.ok()? {
            session.write_response_body(chunk, false).await.ok()?;
        }
        session.finish_body().await.ok()?;
        self.connector
            .release_http_session(upstream, &self.peer, None)
            .await;
        let persistent = HttpPersistentSettings::for_session(&session);
        let reusable = session.finish().await.ok()??;
        Some(ReusedHttpStream::from_reusable_stream(reusable, persistent))
    }
}

fn main() {
    let cli = Cli::parse();
    let mut server = server(&cli);
    let app = Bare {
        connector: Connector::new(None),
        peer: HttpPeer::new(cli.upstream.as_str(), false, String::new()),
    };
    let mut service = pingora::services::listening::Service::new("bare".to_owned(), app);
    service.add_tcp(&cli.listen);
    server.add_service(service);
    server.run_forever();
}
