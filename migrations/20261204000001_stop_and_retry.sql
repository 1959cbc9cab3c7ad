-- Stopping a reply and retrying a message (docs/API.md, "Stop and retry").
--
-- A user message is `answering` once a worker has taken its job and `cancelled` when its user
-- stopped it before the model was asked; an assistant message cut short by a stop keeps the
-- text streamed so far and is `stopped`.
alter table ai_messages drop constraint ai_messages_status_check;
alter table ai_messages add constraint ai_messages_status_check
    check (status in ('queued', 'answering', 'answered', 'failed', 'cancelled', 'complete'));
alter table ai_messages
    add column stopped boolean not null default false,
    -- set when the user asked to stop a message being answered: whichever worker runs its job
    -- (now, or after the one that held it died) stops instead of asking the model again
    add column stop_requested_at timestamptz,
    -- what the message holds of its user's daily token budget (`shared/src/budget.rs`): the UTC
    -- day of the reservation and its tokens, so whoever ends the message without a reply (a
    -- stop before the model started) gives it back
    add column budget_day date,
    add column budget_tokens integer;
-- What the sweeper looks at: messages that still wait for a reply.
drop index ai_messages_queued_idx;
create index ai_messages_pending_idx on ai_messages (id) where status in ('queued', 'answering');
