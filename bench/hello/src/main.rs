//! `bench-hello`: the smallest useful backend for proxy benchmarks.
//!
//! - `GET /` (and any other path): `Hello, world!` (13 bytes).
//! - `GET /health`: 200.
//! - `POST /upload`: reads the body as it streams, answers its length.
//! - `GET /download/{bytes}`: streams that many bytes in 64 KiB chunks.

use std::net::SocketAddr;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Request};
use axum::routing::{get, post};
use clap::Parser;
use http_body_util::BodyExt;

#[derive(Debug, Parser)]
struct Cli {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:7001")]
    listen: SocketAddr,
    /// Tokio worker threads.
    #[arg(long, default_value_t = 1)]
    threads: usize,
}

const CHUNK: usize = 64 * 1024;

async fn upload(request: Request) -> String {
    let mut body = request.into_body();
    let mut total = 0u64;
    while let Some(Ok(frame)) = body.frame().await {
        if let Ok(data) = frame.into_data() {
            total += data.len() as u64;
        }
    }
    total.to_string()
}

async fn download(Path(bytes): Path<u64>) -> Body {
    let chunk = Bytes::from(vec![b'x'; CHUNK]);
    let full = bytes / CHUNK as u64;
    let rest = (bytes % CHUNK as u64) as usize;
    let chunks = (0..full)
        .map(move |_| chunk.clone())
        .chain((rest > 0).then(|| Bytes::from(vec![b'x'; rest])))
        .map(Ok::<_, std::io::Error>);
    Body::from_stream(futures_util::stream::iter(chunks))
}

fn main() -> std::io::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cli.threads)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let app = Router::new()
            .route("/health", get(|| async { "ok" }))
            .route("/upload", post(upload))
            .route("/download/{bytes}", get(download))
            .fallback(|| async { "Hello, world!" });
        let listener = tokio::net::TcpListener::bind(cli.listen).await?;
        println!("bench-hello listening on http://{}", listener.local_addr()?);
        axum::serve(listener, app).await
    })
}
