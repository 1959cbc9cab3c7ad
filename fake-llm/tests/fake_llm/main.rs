//! The fake model's tests, one binary: its chat completions (plain and streamed), its control
//! API, the failures it can inject, and a real OpenAI client against it.
mod common;

mod async_openai_client;
mod chat;
mod control;
mod failures;
