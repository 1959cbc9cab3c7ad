-- The whole aichat schema: accounts, user-to-user chats, AI chats and their messages.

create table users (
    id            bigserial primary key,
    username      varchar(150) not null unique,
    email         varchar(254) not null default '',
    password_hash text not null,
    is_staff      boolean not null default false,
    created_at    timestamptz not null default now()
);

create table sessions (
    id         bigserial primary key,
    user_id    bigint not null references users (id) on delete cascade,
    token_hash bytea not null,
    created_at timestamptz not null default now(),
    expires_at timestamptz not null
);
create unique index sessions_token_hash_idx on sessions (token_hash);
create index sessions_user_id_idx on sessions (user_id);

create table chats (
    id         bigserial primary key,
    name       varchar(255) not null,
    created_at timestamptz not null default now()
);

create table chat_participants (
    chat_id bigint not null references chats (id) on delete cascade,
    user_id bigint not null references users (id) on delete cascade,
    primary key (chat_id, user_id)
);
create index chat_participants_user_id_idx on chat_participants (user_id);

create table chat_messages (
    id        bigserial primary key,
    chat_id   bigint not null references chats (id) on delete cascade,
    sender_id bigint not null references users (id) on delete cascade,
    content   text not null,
    timestamp timestamptz not null default now()
);
create index chat_messages_chat_id_id_idx on chat_messages (chat_id, id);

create table ai_chats (
    id              bigserial primary key,
    user_id         bigint not null references users (id) on delete cascade,
    related_chat_id bigint references chats (id) on delete set null,
    title           varchar(255) not null,
    system_prompt   text not null,
    model           varchar(100) not null,
    created_at      timestamptz not null default now(),
    updated_at      timestamptz not null default now()
);
create index ai_chats_user_id_updated_at_idx on ai_chats (user_id, updated_at desc);
create index ai_chats_related_chat_id_idx on ai_chats (related_chat_id);

create table ai_messages (
    id                bigserial primary key,
    ai_chat_id        bigint not null references ai_chats (id) on delete cascade,
    role              varchar(16) not null check (role in ('user', 'assistant', 'system')),
    content           text not null,
    timestamp         timestamptz not null default now(),
    status            varchar(16) not null check (status in ('queued', 'answered', 'failed', 'complete')),
    error             text,
    prompt_tokens     integer,
    completion_tokens integer,
    total_tokens      integer,
    model             varchar(100),
    latency_ms        integer,
    -- the user message an assistant message answers: at most one answer each
    reply_to          bigint references ai_messages (id) on delete cascade,
    -- what the completion job needs, kept so a queued message can be re-enqueued
    include_related_chat_context boolean not null default false,
    context_message_limit        integer not null default 20,
    -- set once the completion job is known to be in the queue
    dispatched_at     timestamptz
);
create index ai_messages_ai_chat_id_id_idx on ai_messages (ai_chat_id, id);
create unique index ai_messages_reply_to_idx on ai_messages (reply_to) where reply_to is not null;
create index ai_messages_queued_idx on ai_messages (id) where status = 'queued';
