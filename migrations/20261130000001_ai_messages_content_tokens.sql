-- Tokens of a message's content (tiktoken cl100k_base), written by the worker when it answers:
-- on the user message it answered and on its reply. Every later job of the chat reads these
-- counts with the history instead of running BPE over the whole conversation again; a message
-- without one (older rows, messages not answered yet) is counted by the worker as before.
-- Content never changes after insert, so a count never goes stale. Nullable with no default:
-- adding it rewrites nothing.
alter table ai_messages add column content_tokens integer;
