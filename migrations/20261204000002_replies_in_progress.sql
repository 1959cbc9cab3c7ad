-- The messages of a chat whose reply is in progress, for a socket that catches up
-- (`db::ai_messages::answering_in_chat`): only the few messages being answered are indexed.
create index ai_messages_answering_idx on ai_messages (ai_chat_id, id) where status = 'answering';
