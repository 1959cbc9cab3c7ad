//! The fake model's tests, one binary: its chat completions (plain and streamed), its control
//! API, the failures it can inject (mid-stream cuts included), how streamed responses end
//! (client hang-ups), and a real OpenAI client against it.
mod common;

mod async_openai_client;
mod chat;
mod control;
mod cut;
mod failures;
mod hang_up;
