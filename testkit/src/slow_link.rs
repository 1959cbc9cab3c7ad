//! A slow link from one process to a server: a TCP proxy that delivers what its clients send
//! a fixed delay late (what the server answers passes at once). Each chunk keeps its own
//! deadline, so a burst is late by the delay once, not once per chunk: a link far away, not a
//! congested one. For orders that only a slow link shows, such as a publish that a second
//! round trip makes after a push on a link as slow as this one.
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio::time::Instant;

pub struct SlowLink {
    port: u16,
    task: JoinHandle<()>,
}

impl SlowLink {
    /// Listens on a free port of 127.0.0.1 and forwards each connection to `upstream`
    /// (`host:port`), its client's bytes `delay` late.
    pub async fn start(upstream: &str, delay: Duration) -> SlowLink {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("local address").port();
        let upstream = upstream.to_owned();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let upstream = upstream.clone();
                tokio::spawn(async move {
                    if let Ok(server) = TcpStream::connect(&upstream).await {
                        forward(client, server, delay).await;
                    }
                });
            }
        });
        SlowLink { port, task }
    }

    /// `redis://` to the link, for a Redis server behind it.
    pub fn redis_url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

impl Drop for SlowLink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Client to server `delay` late, server to client at once, until either side closes.
async fn forward(client: TcpStream, server: TcpStream, delay: Duration) {
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let (chunks, mut late) = tokio::sync::mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let reading = async move {
        let mut buf = vec![0u8; 64 * 1024];
        while let Ok(n) = client_read.read(&mut buf).await {
            if n == 0
                || chunks
                    .send((Instant::now() + delay, buf[..n].to_vec()))
                    .is_err()
            {
                break;
            }
        }
    };
    let delivering = async move {
        while let Some((due, chunk)) = late.recv().await {
            tokio::time::sleep_until(due).await;
            if server_write.write_all(&chunk).await.is_err() {
                break;
            }
        }
    };
    let answering = async move {
        let _ = tokio::io::copy(&mut server_read, &mut client_write).await;
    };
    tokio::select! {
        _ = async { tokio::join!(reading, delivering) } => {}
        _ = answering => {}
    }
}
