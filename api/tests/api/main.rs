//! The API's tests, one binary (each binary links the whole stack): the real router (or
//! binary) on a random port against a fresh database and a Redis namespace of its own, over
//! HTTP and WebSocket. One module per area.
mod common;

mod access;
mod accounts;
mod admin;
mod ai_chats;
mod bad_input;
mod chats;
mod deploy;
mod docs_and_ops;
mod export;
mod models;
mod paging;
mod pipeline;
mod quotas;
mod resume;
mod send_batch;
mod send_message;
mod session_cache;
mod stop_retry;
mod versions;
mod web;
mod websocket;

// The threats of SECURITY.md, one module per kind of attacker.
mod connections;
mod cross_site;
mod login_abuse;
mod operators;
mod session_revocation;
