-- The worker's history query (shared/src/db/completions.rs::list_history) orders a chat's
-- messages by turn: a reply sits with the question it answers (`reply_to`), anything else with
-- itself. With this index the latest turns before a message are read in order and the scan
-- stops at the limit, instead of reading and sorting every message of the chat per job.
create index ai_messages_ai_chat_id_turn_idx
    on ai_messages (ai_chat_id, (coalesce(reply_to, id)) desc, id desc);
