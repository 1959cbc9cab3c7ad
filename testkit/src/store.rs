//! Messages stored the way the API stores them: through the send statement
//! (`db::ai_messages::insert_owned_user_messages`, ownership checked) and the completion queue
//! with the API's de-duplication key, for suites that drive the worker without an API.
use aichat_shared::db;
use aichat_shared::db::ai_chats::NewAiChat;
use aichat_shared::db::ai_messages::{Branches, NewUserMessage};
use aichat_shared::domain::{AiMessage, ContextOptions, User};
use aichat_shared::jobs::{CompletionJob, JobQueue};
use sqlx::PgPool;

use crate::MODEL;
use crate::stack::Env;

/// What a send asks when it asks for nothing special (the API's defaults): no related chat,
/// the last 20 messages.
pub const DEFAULT_CONTEXT: ContextOptions = ContextOptions {
    include_related_chat_context: false,
    context_message_limit: 20,
};

/// Rows a test needs before it sends anything, stored directly (suites without an API).
impl Env {
    pub async fn user(&self, username: &str) -> User {
        db::users::insert_user(&self.pool, username, "", "not-a-hash", false)
            .await
            .expect("insert user")
    }

    /// A user-to-user chat with these participants and messages `(sender, content)`.
    pub async fn chat(&self, name: &str, participants: &[i64], messages: &[(i64, &str)]) -> i64 {
        let mut conn = self.pool.acquire().await.expect("connection");
        let chat = db::chats::insert_chat(&mut conn, name, participants)
            .await
            .expect("insert chat");
        for (sender, content) in messages {
            db::chats::insert_chat_message(&mut conn, chat.id, *sender, content)
                .await
                .expect("insert chat message")
                .expect("the chat just inserted");
        }
        chat.id
    }

    /// An AI chat of `owner` on the test model.
    pub async fn ai_chat(&self, owner: i64, system_prompt: &str, related: Option<i64>) -> i64 {
        db::ai_chats::insert_ai_chat(
            &self.pool,
            &NewAiChat {
                user_id: owner,
                title: "test",
                system_prompt,
                related_chat: related,
                model: MODEL,
            },
        )
        .await
        .expect("insert ai chat")
    }

    /// Every message of an AI chat, oldest first.
    pub async fn messages(&self, ai_chat_id: i64) -> Vec<AiMessage> {
        db::ai_messages::list_chat_messages(&self.pool, ai_chat_id, Branches::All, None, None)
            .await
            .expect("list messages")
    }

    pub async fn message(&self, ai_chat_id: i64, id: i64) -> AiMessage {
        self.messages(ai_chat_id)
            .await
            .into_iter()
            .find(|m| m.id == id)
            .expect("message exists")
    }
}

/// The user whose AI chat `ai_chat_id` is.
pub async fn chat_owner(db: &PgPool, ai_chat_id: i64) -> i64 {
    sqlx::query_scalar("select user_id from ai_chats where id = $1")
        .bind(ai_chat_id)
        .fetch_one(db)
        .await
        .expect("the AI chat exists")
}

/// Stores a queued user message in `ai_chat_id`, sent by the chat's owner, without a job.
pub async fn store_user_message(
    db: &PgPool,
    ai_chat_id: i64,
    content: &str,
    options: ContextOptions,
) -> AiMessage {
    let owner = chat_owner(db, ai_chat_id).await;
    let stored = db::ai_messages::insert_owned_user_messages(
        db,
        &[NewUserMessage {
            ai_chat_id,
            user_id: owner,
            content: content.to_owned(),
            options,
            budget: None,
        }],
    )
    .await
    .expect("store the user message");
    stored
        .into_iter()
        .next()
        .flatten()
        .expect("the owner's message is stored")
}

/// Queues the completion job of `message`, sent by `owner`, as the API's send does (same
/// arguments, the sender's id, same de-duplication key); whether a new job was queued. A
/// connection that lost its server reports the first command after as an error and
/// reconnects: tried up to three times (the key makes a repeat harmless).
pub async fn queue_completion(
    queue: &JobQueue,
    message: &AiMessage,
    owner: i64,
    options: ContextOptions,
) -> bool {
    let job = CompletionJob::new(message.id, message.ai_chat, options, Some("test".into()))
        .for_user(owner);
    let key = queue.message_job_key(message.id);
    let mut tries = 0;
    loop {
        tries += 1;
        match queue.enqueue_completion(&job, &key).await {
            Ok(queued) => return queued,
            Err(err) if tries < 3 => eprintln!("enqueue failed, retrying: {err}"),
            Err(err) => panic!("enqueue: {err}"),
        }
    }
}
