//! The worker binary as a process: killed mid-job (SIGKILL, no goodbye), another worker takes
//! the job over after the orphan window and the reply is saved and announced exactly once; and
//! a worker that could never be answered by its model refuses to start.

use std::time::{Duration, Instant};

use crate::common::{TestEnv, fake_with_latency};
use aichat_testkit::WorkerProcess;
use tokio::process::Command;

const HEARTBEAT: Duration = Duration::from_secs(1);
const MISSED_HEARTBEATS: u32 = 2;
const MODEL_LATENCY: Duration = Duration::from_secs(3);

/// Starts the `aichat-worker` binary for this test (heartbeats as above) and waits until it
/// takes jobs.
async fn ready_binary(env: &TestEnv) -> WorkerProcess {
    let heartbeat = HEARTBEAT.as_secs().to_string();
    let missed = MISSED_HEARTBEATS.to_string();
    let flags = [
        "--worker-heartbeat-secs",
        &heartbeat,
        "--worker-missed-heartbeats",
        &missed,
    ];
    let worker = env.worker_process(env!("CARGO_BIN_EXE_aichat-worker"), &flags);
    env.wait_ready(worker.port).await;
    worker
}

#[tokio::test]
async fn a_killed_workers_job_is_finished_by_another_exactly_once() {
    let latency_ms = u64::try_from(MODEL_LATENCY.as_millis()).unwrap_or(3000);
    let env = TestEnv::start(fake_with_latency(latency_ms)).await;
    let (chat, mut events) = env.watched_chat().await;

    let mut doomed = ready_binary(&env).await;
    let sent = env.ask(chat, "survive this").await;
    // The first worker has the job and is waiting on the model.
    let held = env.fake.wait_for_requests(1, Duration::from_secs(20)).await;
    assert_eq!(held.len(), 1);

    let mut rescuer = ready_binary(&env).await;
    doomed.sigkill();
    let killed_at = Instant::now();
    doomed
        .wait(Duration::from_secs(10))
        .await
        .expect("killed worker reaped");

    // Orphan window, plus up to one heartbeat of the rescuer and one second of rounding
    // (apalis-redis keeps heartbeats in whole seconds), plus the model call, plus 1 s slack.
    let bound =
        HEARTBEAT * MISSED_HEARTBEATS + HEARTBEAT * 2 + MODEL_LATENCY + Duration::from_secs(1);
    let reply = events
        .reply_to(sent.id, bound + Duration::from_secs(10))
        .await;
    let elapsed = killed_at.elapsed();
    assert!(
        elapsed <= bound,
        "reply {elapsed:?} after the kill, allowed {bound:?}"
    );
    assert_eq!(reply["message"]["content"], "Echo: survive this");

    // Exactly once: one reply stored, one announced, two model calls (the killed one included).
    env.wait_queue_set("done", 1, Duration::from_secs(10)).await;
    events.drain(&env, chat).await;
    assert_eq!(events.of_type("assistant_message").len(), 1);
    env.assert_answered_once(chat, sent.id).await;
    assert_eq!(env.fake.requests().len(), 2);
    eprintln!("reply arrived {elapsed:?} after SIGKILL (bound {bound:?})");

    rescuer.kill().await;
    env.cleanup().await;
}

/// Runs the worker binary with `key` as `OPENAI_API_KEY` against `base_url` until it exits (at
/// most 20 s); its exit status and what it wrote to stderr.
async fn start_with_key(key: &str, base_url: &str) -> (Option<i32>, String) {
    start_with_env(&[("OPENAI_API_KEY", key), ("OPENAI_BASE_URL", base_url)]).await
}

/// Runs the worker binary with `vars` until it exits (at most 20 s); its exit status and what
/// it wrote to stderr.
async fn start_with_env(vars: &[(&str, &str)]) -> (Option<i32>, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_aichat-worker"))
        .envs(vars.iter().copied())
        // Nothing listens here: a worker that got past the check would not get far, and the
        // test would time out instead of passing.
        .env("DATABASE_URL", "postgres://postgres@127.0.0.1:1/none")
        .env("REDIS_URL", "redis://127.0.0.1:1")
        .env("METRICS_ADDR", "127.0.0.1:0")
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(20), output)
        .await
        .expect("the worker exits at once")
        .expect("run the worker binary");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test]
async fn a_worker_without_a_key_for_a_remote_model_refuses_to_start_and_says_why() {
    for key in ["", "   "] {
        let (code, stderr) = start_with_key(key, "https://models.example.com/v1").await;
        assert_eq!(code, Some(1), "{stderr}");
        assert!(stderr.contains("OPENAI_API_KEY is empty"), "{stderr}");
        assert!(stderr.contains("https://models.example.com/v1"), "{stderr}");
    }
    // A model server on this machine (the fake, a local server) takes no key: that worker
    // gets past the check and fails later, on Redis, which nothing here serves.
    let (code, stderr) = start_with_key("", "http://127.0.0.1:9/v1").await;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(!stderr.contains("OPENAI_API_KEY"), "{stderr}");
    assert!(stderr.contains("Redis"), "{stderr}");
}

/// A model of `MODELS_FILE` whose key variable is not set: the worker (which calls models, so
/// reads their keys) refuses to start, naming the variable and the line.
#[tokio::test]
async fn a_worker_whose_registry_names_an_unset_key_variable_refuses_to_start() {
    let var = "AICHAT_TEST_KEY_NEVER_SET";
    let file = std::env::temp_dir().join(format!(
        "{}.toml",
        aichat_testkit::unique_name("aichat_registry")
    ));
    let registry = format!(
        "[[models]]\nname = \"remote\"\nbase_url = \"https://models.example.com/v1\"\n\
         api_key_env = \"{var}\"\n"
    );
    std::fs::write(&file, registry).expect("write the registry");
    let path = file.to_str().expect("a UTF-8 path");
    let (code, stderr) = start_with_env(&[("MODELS_FILE", path)]).await;
    let _ = std::fs::remove_file(&file);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains(var) && stderr.contains("line 4"),
        "{stderr}"
    );
}

/// The metadata hashes of the workers' queue consumers (`{workers set}:metadata:{name}`).
async fn consumer_metadata(env: &TestEnv) -> Vec<String> {
    let workers_set =
        aichat_shared::jobs::queue_config(&aichat_shared::keys::Namespace::new(env.ns.clone()))
            .workers_set();
    let mut conn = env.redis.clone();
    redis::cmd("KEYS")
        .arg(format!("{workers_set}:metadata:*"))
        .query_async(&mut conn)
        .await
        .expect("keys")
}

/// Every consumer start registers a name of its own, with a metadata hash: a worker killed
/// loses its registration to the next worker's look for orphans, and one stopped removes its
/// own; neither leaves its hash behind.
#[tokio::test]
async fn workers_leave_no_registration_behind() {
    let env = TestEnv::start(fake_with_latency(0)).await;
    let mut doomed = ready_binary(&env).await;
    let mut survivor = ready_binary(&env).await;
    assert_eq!(consumer_metadata(&env).await.len(), 2);
    doomed.sigkill();
    doomed
        .wait(Duration::from_secs(10))
        .await
        .expect("killed worker reaped");
    aichat_testkit::eventually(Duration::from_secs(15), "the killed one's gone", || async {
        (consumer_metadata(&env).await.len() == 1).then_some(())
    })
    .await;
    survivor.sigterm();
    survivor
        .wait(Duration::from_secs(30))
        .await
        .expect("the survivor stops");
    assert_eq!(consumer_metadata(&env).await, Vec::<String>::new());
    env.cleanup().await;
}
