-- One row naming this database. It is created with the schema, so a database dropped and
-- created again gets a new one, while a dump restored elsewhere keeps it. Redis keys that hold
-- this database's ids (job de-duplication keys, idempotency keys, budgets, announcement
-- markers) carry it, so Redis state left by an earlier database in the same namespace never
-- matches a new message (`shared/src/keys.rs`).
create table installation (
    id uuid primary key default gen_random_uuid(),
    created_at timestamptz not null default now(),
    only_row boolean not null default true unique check (only_row)
);
insert into installation default values;
