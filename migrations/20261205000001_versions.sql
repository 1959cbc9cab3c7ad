-- Versions and branches of a conversation (docs/API.md, "Versions and branches").
--
-- A conversation is a tree of turns. A user message follows the question of the turn before
-- it (`parent_id`, null for the first); a reply follows the question it answers (`parent_id` =
-- `reply_to`). `version` numbers siblings: user messages with the same parent (an edit adds
-- one), replies to the same question (a regeneration adds one). `active` marks the path the
-- user sees, which is also what the model is sent: one version of each turn, and of each
-- question one reply. Every message stored before this migration is on the one active path.
-- `parent_id` has no foreign key: its check would lock the previous question on every send (a
-- tuple lock written to the WAL, and a multixact while a reply save holds that question), for a
-- link every writer keeps anyway: a parent is an earlier message of the same chat, messages are
-- removed only with their chat or by `db::ai_messages::delete_undispatched_messages`, which
-- hands the removed message's followers to its parent.
alter table ai_messages
    add column parent_id bigint,
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
-- followers of a message removed unqueued).
create index ai_messages_parent_id_idx on ai_messages (parent_id) where parent_id is not null;
-- The worker's history (`db::completions::list_history`) reads the active path by turn; a
-- question off the path walks its ancestors instead.
drop index ai_messages_ai_chat_id_turn_idx;
create index ai_messages_active_turn_idx
    on ai_messages (ai_chat_id, (coalesce(reply_to, id)) desc, id desc) where active;

-- The last question of a chat's active path: what a new message follows. A row of its own per
-- chat, which sends, edits and branch switches of the chat lock (`for update`) and move, so each
-- reads it as the one before left it, without a query whose plan could read the whole chat. Not
-- a column of `ai_chats`: every send and reply save holds that row `for key share`, and moving a
-- value on a row so shared while other sends queue for it deadlocks in PostgreSQL.
create table ai_chat_tips (
    ai_chat_id      bigint primary key references ai_chats (id) on delete cascade,
    question_id     bigint
);
insert into ai_chat_tips (ai_chat_id, question_id)
select a.id, (select max(m.id) from ai_messages m where m.ai_chat_id = a.id and m.role = 'user')
from ai_chats a;
