-- What the workers' context cache (a chat's history kept in Redis and extended with the turns
-- after it, `worker/src/history_cache.rs`) is checked against. The cache holds only turns that
-- have ended (answered, failed or cancelled), and such a turn changes only by a statement that
-- also adds one to this: a requeue (regenerate, retry, a staff re-drive) and a change of the
-- active path (edit, branch switch). A cache entry read at another epoch is not used.
-- Not touched by sends or reply saves: they hold the chat row `for key share` and only add
-- turns after the ones cached.
alter table ai_chats add column history_epoch bigint not null default 0;
