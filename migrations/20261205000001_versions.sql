-- Versions and branches of a conversation (docs/API.md, "Versions and branches").
--
-- A conversation is a tree of turns. A user message follows the question of the turn before
-- it (`parent_id`, null for the first); a reply follows the question it answers (`parent_id` =
-- `reply_to`). `version` numbers siblings: user messages with the same parent (an edit adds
-- one), replies to the same question (a regeneration adds one). `active` marks the path the
-- user sees, which is also what the model is sent: one version of each turn, and of each
-- question one reply. Every message stored before this migration is on the one active path.
alter table ai_messages
    add column parent_id bigint references ai_messages (id),
    add column version integer not null default 1,
    add column active boolean not null default true,
    -- on a user message: the version of its reply being made (a requeue sets the next one,
    -- so each (question, regeneration) has one reply), else of the reply it shows, which it
    -- shows again when its branch becomes the active path once more
    add column reply_version integer not null default 1;

update ai_messages m set parent_id = p.parent_id
from (
    select id,
           case when role = 'assistant' then reply_to
                else lag(id) over (partition by ai_chat_id, role = 'assistant' order by id)
           end as parent_id
    from ai_messages
) p
where p.id = m.id and p.parent_id is not null;

-- One reply per (question, version) instead of one per question.
drop index ai_messages_reply_to_idx;
create unique index ai_messages_reply_to_version_idx
    on ai_messages (reply_to, version) where reply_to is not null;
-- A message's children: the next turns and the replies (edits, branch switches, and the
-- foreign key's check when a message is removed).
create index ai_messages_parent_id_idx on ai_messages (parent_id) where parent_id is not null;
-- The worker's history walks the question's ancestors (`db::completions::list_history`)
-- instead of scanning the chat by turn.
drop index ai_messages_ai_chat_id_turn_idx;

-- The last question of a chat's active path: what a new message follows.
--
-- Volatile and in PL/pgSQL so that its query takes a snapshot of its own when it runs: a
-- send calls it after it has locked the chat (`for no key update`, which sends and branch
-- changes of one chat take in turn), so it sees what the send that held the lock before
-- committed, not only what the calling statement's older snapshot saw.
create function ai_chat_tip(chat bigint) returns bigint
language plpgsql volatile as $$
begin
    return (select max(id) from ai_messages
            where ai_chat_id = chat and role = 'user' and active);
end
$$;
