//! The shared crate's tests against a real PostgreSQL: the SQL of `shared/src/db/` and the
//! conflict retry. One binary, a module per area.
mod claims;
mod planning;
mod retry;
mod saving;
mod versions;

/// A reply of `content` as a worker would store it, without token counts.
pub fn reply(content: &str) -> aichat_shared::db::completions::NewReply {
    aichat_shared::db::completions::NewReply {
        content: content.to_owned(),
        prompt_tokens: None,
        completion_tokens: None,
        total_tokens: None,
        model: aichat_testkit::MODEL.to_owned(),
        latency_ms: 1,
        content_tokens: None,
        question_tokens: None,
        stopped: false,
        cost: None,
        currency: None,
    }
}

/// A job's claim of `message_id` reading up to 20 history rows, knowing `known` of them, with
/// `related` lines of its related chat.
pub fn request(
    message_id: i64,
    known: Option<aichat_shared::db::completions::KnownHistory>,
    related: Option<i64>,
) -> aichat_shared::db::claims::ClaimRequest {
    aichat_shared::db::claims::ClaimRequest {
        message_id,
        known,
        history_limit: 20,
        related_limit: related,
    }
}

/// Edits `question_id` of `user_id`'s chat `ai_chat_id` to `content` and makes the edit's
/// branch the active path, as the API's edit does; the edited question.
pub async fn edit(
    env: &aichat_testkit::Env,
    ai_chat_id: i64,
    user_id: i64,
    question_id: i64,
    content: &str,
) -> aichat_shared::domain::AiMessage {
    use aichat_shared::db;
    let mut tx = env.pool.begin().await.expect("tx");
    assert!(
        db::versions::lock_owned_chat(&mut tx, ai_chat_id, user_id)
            .await
            .expect("lock")
    );
    let edited = db::versions::insert_edit(&mut tx, ai_chat_id, question_id, content, None)
        .await
        .expect("edit")
        .expect("stored");
    db::versions::activate(&mut tx, ai_chat_id, edited.message.id)
        .await
        .expect("activate");
    tx.commit().await.expect("commit");
    edited.message
}
