//! The de-duplication keys of a message's jobs (`JobQueue::next_job_key`): gone once every job
//! of the message is finished and trimmed, kept while one is alive, and a push that read its
//! chain just before the trim still leaves its job where the next walk finds it.

use redis::AsyncCommands;

use crate::common::{TestEnv, WAIT};
use aichat_fake_llm::FakeConfig;
use aichat_shared::jobs::{CompletionJob, NextJob};
use aichat_testkit::{DEFAULT_CONTEXT, eventually, with_sweeper};

impl TestEnv {
    /// The de-duplication keys in Redis, without their prefix, sorted.
    async fn job_keys(&self) -> Vec<String> {
        let prefix = format!("{}:", self.queue.config().idempotency_key_set());
        let mut conn = self.redis.clone();
        let mut keys: Vec<String> = conn
            .keys(format!("{prefix}*"))
            .await
            .expect("read job keys");
        for key in &mut keys {
            key.drain(..prefix.len());
        }
        keys.sort_unstable();
        keys
    }
}

#[tokio::test]
async fn a_message_whose_jobs_are_all_finished_keeps_no_job_keys() {
    let env = TestEnv::start(FakeConfig::default()).await;
    let (chat, mut events) = env.watched_chat().await;
    // Two messages answered by their first job, and one answered again after it: a second
    // job pushed after the first one finished, under the rescue key the chain leads to.
    let first = env.ask(chat, "one").await;
    let second = env.ask(chat, "two").await;
    let worker = env.spawn_worker(&with_sweeper("1", "60", &[])).await;
    events.replies_to_all(&[first.id, second.id], WAIT).await;
    let next = env
        .queue
        .next_job_key_after_answer(second.id)
        .await
        .expect("chain");
    let NextJob::Push { key, chain, .. } = &next else {
        panic!("the chain of an answered message ends in a key to push under: {next:?}");
    };
    assert_eq!(chain.len(), 1, "one job before: {next:?}");
    assert_eq!(*key, env.queue.rescue_job_key(second.id, &chain[0].1));
    let again = CompletionJob::new(second.id, chat, DEFAULT_CONTEXT, None);
    assert!(
        env.queue
            .enqueue_next(&again, &next, &[])
            .await
            .expect("push")
    );
    // The third job finds its message answered and ends; then the sweeper trims all three.
    env.wait_queue_set("done", 3, WAIT).await;

    eventually(WAIT, "the sweeper to delete every job key", || async {
        env.job_keys().await.is_empty().then_some(())
    })
    .await;
    // A message whose keys are gone starts its chain again from its first key.
    assert_eq!(
        env.queue.next_job_key(first.id).await.expect("chain"),
        NextJob::Push {
            key: env.queue.message_job_key(first.id),
            chain: Vec::new(),
        }
    );
    env.finish([worker]).await;
}

#[tokio::test]
async fn a_push_that_read_its_chain_before_the_trim_leaves_its_job_findable() {
    let env = TestEnv::start(FakeConfig::default()).await;
    let (chat, mut events) = env.watched_chat().await;
    let sent = env.ask(chat, "answer me").await;
    let worker = env.spawn_worker(&[]).await;
    events.reply_to(sent.id, WAIT).await;
    env.wait_queue_set("done", 1, WAIT).await;
    worker.stop().await;

    // A regeneration reads where the chain ends; the sweeper trims the finished job and its
    // keys before the regeneration pushes.
    let next = env
        .queue
        .next_job_key_after_answer(sent.id)
        .await
        .expect("chain");
    assert!(
        matches!(&next, NextJob::Push { chain, .. } if chain.len() == 1),
        "{next:?}"
    );
    assert_eq!(env.queue.trim_done(100).await.expect("trim"), 1);
    assert_eq!(env.job_keys().await, Vec::<String>::new(), "keys trimmed");
    let job = CompletionJob::new(sent.id, chat, DEFAULT_CONTEXT, None);
    assert!(
        env.queue
            .enqueue_next(&job, &next, &[])
            .await
            .expect("push")
    );

    // The waiting job is where a sweep looks: no second job for it.
    assert_eq!(
        env.queue.next_job_key(sent.id).await.expect("chain"),
        NextJob::Alive
    );
    // And a trim while it waits keeps the chain to it.
    env.queue.trim_done(100).await.expect("trim");
    assert_eq!(env.job_keys().await.len(), 2, "{:?}", env.job_keys().await);
    assert_eq!(
        env.queue.next_job_key(sent.id).await.expect("chain"),
        NextJob::Alive
    );
    env.cleanup().await;
}
