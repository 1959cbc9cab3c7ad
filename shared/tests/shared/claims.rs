//! `db::claims::claim_jobs`, the claim of several jobs in one statement: each claim answers
//! what `db::completions::claim_job` answers for it alone, and a row another transaction holds
//! is waited for only after the batch let go of its other rows.
use aichat_fake_llm::FakeConfig;
use aichat_shared::db;
use aichat_shared::db::claims::ClaimRequest;
use aichat_shared::db::completions::KnownHistory;
use aichat_testkit::postgres::wait_for_a_lock_waiter;
use aichat_testkit::{DEFAULT_CONTEXT, Env as TestEnv, store_user_message};

use crate::{reply, request};

async fn epoch(env: &TestEnv, chat: i64) -> i64 {
    sqlx::query_scalar("select history_epoch from ai_chats where id = $1")
        .bind(chat)
        .fetch_one(&env.pool)
        .await
        .expect("epoch")
}

/// Every case a job meets, in one batch: histories with answered, failed, cancelled and
/// waiting turns, a related chat, a question left off its chat's path, a cached history still
/// current and one gone stale, an answered message, a stopped one, a reply's id, a missing id,
/// and the same message twice. The batch's answers are the single statement's, field for field.
#[tokio::test]
async fn a_batch_answers_each_claim_as_the_single_claim_does() {
    let env = TestEnv::start(FakeConfig::default()).await;
    let alice = env.user("alice").await;
    let bob = env.user("bob").await;
    let pool = env.pool.clone();
    let send = async |chat: i64, content: &str| {
        store_user_message(&pool, chat, content, DEFAULT_CONTEXT).await
    };
    let answer = async |question: i64, content: &str| {
        db::completions::save_reply(&pool, question, &reply(content))
            .await
            .expect("save")
            .expect("saved")
    };

    // A chat whose turns ended every way, then a question.
    let long = env.ai_chat(alice.id, "system", None).await;
    let q1 = send(long, "q1").await;
    answer(q1.id, "a1").await;
    let q2 = send(long, "q2").await;
    db::completions::mark_failed(&env.pool, q2.id, "no")
        .await
        .expect("fail");
    let q3 = send(long, "q3").await;
    db::stops::cancel(&env.pool, q3.id).await.expect("cancel");
    let q4 = send(long, "q4").await;
    let a4 = answer(q4.id, "a4").await;
    let q5 = send(long, "q5").await;
    answer(q5.id, "a5").await;
    let waiting = send(long, "q6").await;

    // With a related chat alice takes part in.
    let people = env
        .chat(
            "people",
            &[alice.id, bob.id],
            &[(bob.id, "hi"), (alice.id, "hello")],
        )
        .await;
    let related = env.ai_chat(alice.id, "system", Some(people)).await;
    let r1 = send(related, "r1").await;
    answer(r1.id, "ra1").await;
    let with_related = send(related, "r2").await;

    // A question left off the path by an edit of the turn before it.
    let branched = env.ai_chat(alice.id, "system", None).await;
    let b1 = send(branched, "b1").await;
    answer(b1.id, "ba1").await;
    let off_path = send(branched, "b2").await;
    crate::edit(&env, branched, alice.id, b1.id, "b1 again").await;

    // An answered question, and one its user stopped while an earlier run answered it.
    let answered = env.ai_chat(alice.id, "system", None).await;
    let done = send(answered, "done").await;
    answer(done.id, "yes").await;
    let stopped = send(answered, "stop me").await;
    db::completions::claim_job(&env.pool, stopped.id, None, 20, None)
        .await
        .expect("first run")
        .expect("the message");
    db::stops::request_stop(&env.pool, stopped.id, alice.id)
        .await
        .expect("stop")
        .expect("waiting");

    let current = KnownHistory {
        epoch: epoch(&env, long).await,
        through_turn: q4.id,
    };
    let stale = KnownHistory {
        epoch: current.epoch - 1,
        through_turn: q4.id,
    };
    let requests = [
        request(waiting.id, None, None),
        request(waiting.id, Some(current), None),
        request(with_related.id, None, Some(10)),
        request(with_related.id, None, None),
        request(off_path.id, None, Some(10)),
        request(waiting.id, Some(stale), None),
        request(done.id, None, None),
        request(stopped.id, None, None),
        request(a4.id, None, None),
        request(i64::MAX, None, None),
        ClaimRequest {
            history_limit: 3,
            ..request(waiting.id, None, None)
        },
    ];
    let mut conn = env.pool.acquire().await.expect("connection");
    let batch = db::claims::claim_jobs(&mut conn, &requests)
        .await
        .expect("claim batch");
    drop(conn);
    assert_eq!(batch.len(), requests.len());

    for (request, batched) in requests.iter().zip(&batch) {
        let alone = db::completions::claim_job(
            &env.pool,
            request.message_id,
            request.known,
            request.history_limit,
            request.related_limit,
        )
        .await
        .expect("single claim");
        assert_eq!(
            format!("{batched:?}"),
            format!("{alone:?}"),
            "claim {request:?}"
        );
    }
    // The cases are the ones meant: the batch read what each needed.
    let job = |i: usize| batch[i].as_ref().expect("a job");
    let contents = |i: usize| -> Vec<&str> {
        job(i)
            .history
            .rows
            .iter()
            .map(|r| r.message.content.as_str())
            .collect()
    };
    assert!(job(0).subject.claimed);
    assert_eq!(contents(0), ["q1", "a1", "q4", "a4", "q5", "a5"]);
    assert_eq!(
        contents(1),
        ["q5", "a5"],
        "only the turns after the cached one"
    );
    assert_eq!(contents(5), contents(0), "a stale cache reads everything");
    assert_eq!(
        contents(10),
        ["a4", "q5", "a5"],
        "the newest rows up to the limit"
    );
    let lines: Vec<&str> = job(2)
        .related
        .as_ref()
        .expect("related lines")
        .iter()
        .map(|l| l.content.as_str())
        .collect();
    assert_eq!(lines, ["hi", "hello"]);
    assert!(job(3).related.is_none());
    assert!(!job(4).history.on_path);
    assert_eq!(contents(4), ["b1", "ba1"]);
    assert!(!job(6).subject.claimed && job(6).subject.answered);
    assert!(job(7).subject.claimed && job(7).subject.stop_requested);
    assert!(batch[8].is_none(), "a reply is not a job's message");
    assert!(batch[9].is_none(), "a missing message");
    env.cleanup().await;
}

/// A message whose row another transaction holds is claimed once that transaction ends, and
/// meanwhile the batch holds none of its other rows: it never waits while holding one, so it
/// can close no cycle with the holder.
#[tokio::test]
async fn a_held_row_is_waited_for_after_the_batch_let_go_of_the_others() {
    let env = TestEnv::start(FakeConfig::default()).await;
    let alice = env.user("alice").await;
    let chat = env.ai_chat(alice.id, "system", None).await;
    let first = store_user_message(&env.pool, chat, "first", DEFAULT_CONTEXT).await;
    let held = store_user_message(&env.pool, chat, "held", DEFAULT_CONTEXT).await;
    assert!(
        first.id < held.id,
        "the batch takes the first row before the held one"
    );

    let mut holder = env.pool.begin().await.expect("holder");
    sqlx::query("select id from ai_messages where id = $1 for update")
        .bind(held.id)
        .execute(&mut *holder)
        .await
        .expect("hold the row");
    let pool = env.pool.clone();
    let requests = [request(first.id, None, None), request(held.id, None, None)];
    let claiming = tokio::spawn(async move {
        let mut conn = pool.acquire().await.expect("connection");
        db::claims::claim_jobs(&mut conn, &requests).await
    });
    wait_for_a_lock_waiter(&env.pool, "", "the claim waiting for the held row").await;
    // Meanwhile the other row is free.
    let mut other = env.pool.begin().await.expect("other");
    let free = sqlx::query("select id from ai_messages where id = $1 for update nowait")
        .bind(first.id)
        .execute(&mut *other)
        .await;
    assert!(
        free.is_ok(),
        "the batch held a row while it waited: {free:?}"
    );
    other.rollback().await.expect("rollback");
    holder.commit().await.expect("release");

    let claimed = claiming.await.expect("task").expect("claims");
    for (job, id) in claimed.iter().zip([first.id, held.id]) {
        let job = job.as_ref().expect("the message");
        assert_eq!(job.subject.message_id, id);
        assert!(job.subject.claimed);
    }
    env.cleanup().await;
}

/// A message whose row another transaction changes and commits while the batch statement runs
/// (after its snapshot, before it takes the row) is still claimed: the batch holds the row's
/// newest version, and its update must take that version, not miss it because the statement's
/// snapshot does not see it. A miss answered "not claimed" for a message still waiting, and
/// its job ended without a reply. An edit of an earlier turn changes the row this way (it takes
/// the question off the active path); here another connection flips the same column as fast as
/// it can while one message is claimed again and again (a claim of a message already
/// `answering` claims it, as a second run of a job does).
#[tokio::test]
async fn a_row_changed_while_the_batch_runs_is_still_claimed() {
    let env = TestEnv::start(FakeConfig::default()).await;
    let alice = env.user("alice").await;
    let chat = env.ai_chat(alice.id, "system", None).await;
    let message = store_user_message(&env.pool, chat, "question", DEFAULT_CONTEXT).await;

    let (stop, mut stopped) = tokio::sync::watch::channel(false);
    let pool = env.pool.clone();
    let flipper = tokio::spawn(async move {
        let mut flips = 0u64;
        while !*stopped.borrow_and_update() {
            sqlx::query("update ai_messages set active = not active where id = $1")
                .bind(message.id)
                .execute(&pool)
                .await
                .expect("flip");
            flips += 1;
        }
        flips
    });
    let mut conn = env.pool.acquire().await.expect("connection");
    let mut missed = 0;
    const CLAIMS: usize = 2_000;
    for _ in 0..CLAIMS {
        let batch = db::claims::claim_jobs(&mut conn, &[request(message.id, None, None)])
            .await
            .expect("claim batch");
        let job = batch[0].as_ref().expect("the message");
        if !job.subject.claimed {
            missed += 1;
        }
    }
    drop(conn);
    stop.send(true).expect("stop the flips");
    let flips = flipper.await.expect("flipper");
    assert!(
        flips >= CLAIMS as u64 / 4,
        "the row changed during the claims ({flips} flips over {CLAIMS} claims)"
    );
    assert_eq!(
        missed, 0,
        "claims that missed a waiting message, of {CLAIMS}"
    );
    env.cleanup().await;
}
