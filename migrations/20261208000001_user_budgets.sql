-- A daily token budget staff set for one user (`PUT /api/admin/users/{id}/budget/`): null
-- means the deployment's default (`DAILY_TOKEN_BUDGET`, where 0 is no budget at all); a
-- number is this user's own limit, 0 included (no tokens: every send is refused).
-- Nullable with no default: adding it rewrites nothing, however large the table.
alter table users add column daily_token_budget bigint
    constraint users_daily_token_budget_not_negative check (daily_token_budget >= 0);
