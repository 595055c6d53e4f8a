//! A real etcd for tests: started on free loopback ports with its data in a
//! temp dir, killed when dropped. [`Etcd::stop`] and [`Etcd::start_again`]
//! take it down and bring it back on the same ports and data.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Etcd {
    pub client_port: u16,
    peer_port: u16,
    data: tempfile::TempDir,
    child: Option<Child>,
}

fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

impl Etcd {
    /// Starts a one-member cluster and waits until it answers. A port
    /// picked free can be taken (by another test's socket) before etcd
    /// binds it: etcd then exits, and new ports are tried.
    pub async fn start() -> std::io::Result<Etcd> {
        let mut attempts = 0;
        loop {
            let mut etcd = Etcd {
                client_port: free_port()?,
                peer_port: free_port()?,
                data: tempfile::tempdir()?,
                child: None,
            };
            match etcd.start_again().await {
                Ok(()) => return Ok(etcd),
                Err(err) if err.kind() == std::io::ErrorKind::AddrInUse && attempts < 3 => {
                    attempts += 1;
                }
                Err(err) => return Err(err),
            }
        }
    }

    /// `HOST:PORT` of the client listener.
    pub fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.client_port)
    }

    /// `etcd://127.0.0.1:PORT`, as the services' `--registry` takes it.
    pub fn url(&self) -> String {
        format!("etcd://{}", self.endpoint())
    }

    /// Starts the server again (after [`Self::stop`]) on the same ports
    /// and data.
    pub async fn start_again(&mut self) -> std::io::Result<()> {
        let client = format!("http://127.0.0.1:{}", self.client_port);
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let child = Command::new("etcd")
            .arg("--name=t")
            .arg(format!(
                "--data-dir={}",
                self.data.path().join("member").display()
            ))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=t={peer}"))
            .arg("--logger=zap")
            .arg("--log-level=error")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|err| {
                std::io::Error::other(format!("etcd (scripts/setup.sh installs it): {err}"))
            })?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(15);
        let endpoints = vec![client];
        loop {
            if let Ok(mut etcd) = crate::connect(&endpoints).await
                && let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(1), etcd.status()).await
            {
                // What answered may be another test's etcd on a port taken
                // meanwhile: this one would have exited by now.
                tokio::time::sleep(Duration::from_millis(100)).await;
                return self.exited_early();
            }
            self.exited_early()?;
            if Instant::now() > deadline {
                return Err(std::io::Error::other("etcd did not start in 15 s"));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// An `AddrInUse` error if the server has exited.
    fn exited_early(&mut self) -> std::io::Result<()> {
        if let Some(child) = self.child.as_mut()
            && let Ok(Some(status)) = child.try_wait()
        {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!(
                    "etcd exited ({status}): port {} or {} taken?",
                    self.client_port, self.peer_port
                ),
            ));
        }
        Ok(())
    }

    /// Kills the server (its data stays) and waits until its port is free.
    pub async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        while tokio::net::TcpStream::connect(("127.0.0.1", self.client_port))
            .await
            .is_ok()
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A client on this server.
    pub async fn client(&self) -> etcd_client::Client {
        crate::connect(&[self.endpoint()])
            .await
            .unwrap_or_else(|err| panic!("etcd client: {err}"))
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
