//! The users, chats and messages tests start from, and reading them back. Every helper that
//! creates something asserts the answer that says it was created, so a test that builds on it
//! cannot go on from a refusal.
use reqwest::StatusCode;
use serde_json::{Value, json};

use super::{TestApp, TestUser, spawn_app};

/// A fresh app (the test defaults) with these users, registered and logged in.
pub async fn app_with_users<const N: usize>(names: [&str; N]) -> (TestApp, [TestUser; N]) {
    let app = spawn_app().await;
    let users = app.users(names).await;
    (app, users)
}

/// A fresh app (the test defaults) with one user and an AI chat of theirs (titled "t").
pub async fn app_with_ai_chat(username: &str) -> (TestApp, TestUser, i64) {
    let app = spawn_app().await;
    let (user, chat) = app.user_with_ai_chat(username).await;
    (app, user, chat)
}

/// The path that sends a message to AI chat `chat`.
pub fn send_path(chat: i64) -> String {
    format!("/api/ai/chats/{chat}/send_message/")
}

/// The path of AI chat `chat`'s messages.
pub fn messages_path(chat: i64) -> String {
    format!("/api/ai/chats/{chat}/messages/")
}

/// The `id` of an object the API answered.
pub fn id(object: &Value) -> i64 {
    object["id"]
        .as_i64()
        .unwrap_or_else(|| panic!("no id in {object}"))
}

/// The ids of the items of a list, in its order.
pub fn ids(list: &[Value]) -> Vec<i64> {
    list.iter().map(id).collect()
}

/// One string field of every item of a list, in its order.
pub fn texts(list: &[Value], field: &str) -> Vec<String> {
    list.iter()
        .map(|item| {
            item[field]
                .as_str()
                .unwrap_or_else(|| panic!("no {field} in {item}"))
                .to_owned()
        })
        .collect()
}

/// The items of a list the API answered.
pub fn items(list: &Value) -> &[Value] {
    list.as_array()
        .unwrap_or_else(|| panic!("not a list: {list}"))
}

impl TestApp {
    /// A new user-to-user chat of `owner` with `others`; its id.
    pub async fn create_chat(&self, owner: &TestUser, name: &str, others: &[&TestUser]) -> i64 {
        let ids: Vec<i64> = others.iter().map(|u| u.id).collect();
        let (status, body) = self
            .post(
                "/api/chats/",
                &owner.token,
                json!({"name": name, "participant_ids": ids}),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        id(&body)
    }

    /// A new AI chat of `owner` made of `body`; the chat as the API answered it.
    pub async fn create_ai_chat(&self, owner: &TestUser, body: Value) -> Value {
        let (status, body) = self.post("/api/ai/chats/", &owner.token, body).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        body
    }

    /// A new AI chat of `owner`, titled "t"; its id.
    pub async fn ai_chat_id(&self, owner: &TestUser) -> i64 {
        self.http.ai_chat(owner, "t").await
    }

    /// A new AI chat of `owner`, titled "t" and linked to user-to-user chat `related`; its id.
    pub async fn linked_ai_chat_id(&self, owner: &TestUser, related: i64) -> i64 {
        id(&self
            .create_ai_chat(owner, json!({"title": "t", "related_chat": related}))
            .await)
    }

    /// These users, registered and logged in, in this order.
    pub async fn users<const N: usize>(&self, names: [&str; N]) -> [TestUser; N] {
        let mut users = Vec::with_capacity(N);
        for name in names {
            users.push(self.user(name).await);
        }
        users.try_into().expect("one user per name")
    }

    /// A new user with an AI chat of their own (titled "t").
    pub async fn user_with_ai_chat(&self, username: &str) -> (TestUser, i64) {
        let user = self.user(username).await;
        let chat = self.ai_chat_id(&user).await;
        (user, chat)
    }

    /// A new staff user.
    pub async fn staff(&self, username: &str) -> TestUser {
        let user = self.user(username).await;
        aichat_shared::db::users::set_staff(&self.db, username, true)
            .await
            .expect("make staff");
        user
    }

    /// Sends `content` to AI chat `chat` as `user`; the answer as it is.
    pub async fn send(&self, user: &TestUser, chat: i64, content: &str) -> (StatusCode, Value) {
        self.post(&send_path(chat), &user.token, json!({"content": content}))
            .await
    }

    /// Sends `content` and insists on 202; the stored message.
    pub async fn send_ok(&self, user: &TestUser, chat: i64, content: &str) -> Value {
        let (status, body) = self.send(user, chat, content).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
        body["message"].clone()
    }

    /// Sends `content` with `?wait=` (`true`, or seconds); the answer as it is.
    pub async fn send_waiting(
        &self,
        user: &TestUser,
        chat: i64,
        content: &str,
        wait: &str,
    ) -> (StatusCode, Value) {
        let path = format!("{}?wait={wait}", send_path(chat));
        self.post(&path, &user.token, json!({"content": content}))
            .await
    }

    /// The messages of AI chat `chat` as `user` reads them (first page, oldest first).
    pub async fn messages(&self, user: &TestUser, chat: i64) -> Vec<Value> {
        self.list(&messages_path(chat), &user.token).await
    }

    /// Every AI message of `user`'s (first page, oldest first).
    pub async fn my_messages(&self, user: &TestUser) -> Vec<Value> {
        self.list("/api/ai/messages/", &user.token).await
    }

    /// A list `token` reads at `path`, insisting on 200.
    pub async fn list(&self, path: &str, token: &str) -> Vec<Value> {
        let (status, body) = self.get(path, token).await;
        assert_eq!(status, StatusCode::OK, "{path}: {body}");
        items(&body).to_vec()
    }

    /// Stores `count` answered user messages in AI chat `chat` directly (`message {n}`, then
    /// `padding` more characters each), as a backlog no test needs to send one by one.
    pub async fn insert_messages(&self, chat: i64, count: i32, padding: i32) {
        sqlx::query(
            "insert into ai_messages (ai_chat_id, role, content, status)
             select $1, 'user', 'message ' || g || repeat('x', $3), 'answered'
             from generate_series(1, $2) g",
        )
        .bind(chat)
        .bind(count)
        .bind(padding)
        .execute(&self.db)
        .await
        .expect("messages");
    }

    /// Lets every session of `user_id` expire `secs` seconds from now.
    pub async fn expire_sessions_in(&self, user_id: i64, secs: i32) {
        sqlx::query(
            "update sessions set expires_at = now() + make_interval(secs => $2) where user_id = $1",
        )
        .bind(user_id)
        .bind(secs)
        .execute(&self.db)
        .await
        .expect("shorten the sessions");
    }

    /// Deletes every session of `user_id` behind the API's back (no revocation is published).
    pub async fn delete_sessions(&self, user_id: i64) {
        sqlx::query("delete from sessions where user_id = $1")
            .bind(user_id)
            .execute(&self.db)
            .await
            .expect("delete the sessions");
    }
}
