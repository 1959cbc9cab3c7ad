//! The `aichat-api` binary as a process of a test, for what only a separate process shows (its
//! own metrics recorder, its memory, its exit).
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{TestDb, delete_namespace, free_port, redis_url, unique_name};

/// A child process killed and reaped when dropped, also when the test panics.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The API binary on a free port against a fresh database and namespace of its own.
pub struct ApiProcess {
    pub base: String,
    pub pid: u32,
    child: Option<KillOnDrop>,
    db: TestDb,
    ns: String,
}

impl ApiProcess {
    /// Starts `binary` (pass `env!("CARGO_BIN_EXE_aichat-api")`) with `extra` flags, its log
    /// (stdout) to `log` (errors only unless `extra` sets `--log-filter`), and waits until it
    /// listens (at most 30 s).
    pub async fn start(binary: &str, extra: &[&str], log: impl Into<Stdio>) -> ApiProcess {
        let db = TestDb::create("aichat_test").await;
        let ns = unique_name("aichat_test");
        let addr = format!("127.0.0.1:{}", free_port());
        let redis = redis_url();
        let child = Command::new(binary)
            .args([
                "--api-addr",
                &addr,
                "--database-url",
                &db.url,
                "--redis-url",
                &redis,
                "--aichat-namespace",
                &ns,
            ])
            .args(if extra.contains(&"--log-filter") {
                &[][..]
            } else {
                &["--log-filter", "error"][..]
            })
            .args(extra)
            .stdout(log)
            .stderr(Stdio::null())
            .spawn()
            .expect("start the API binary");
        let pid = child.id();
        let process = ApiProcess {
            base: format!("http://{addr}"),
            pid,
            child: Some(KillOnDrop(child)),
            db,
            ns,
        };
        let client = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        // Polled only while nothing listens yet: the first answered request is the test's.
        while client
            .get(format!("{}/healthz", process.base))
            .send()
            .await
            .is_err()
        {
            assert!(Instant::now() < deadline, "the API never listened");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        process
    }

    /// Stops the process and removes its database and namespace.
    pub async fn cleanup(mut self) {
        drop(self.child.take());
        delete_namespace(&redis_url(), &self.ns).await;
        self.db.drop_database().await;
    }
}
