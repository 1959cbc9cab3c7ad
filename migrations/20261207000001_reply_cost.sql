-- What an assistant reply cost, written by the worker with the reply from the prices of the
-- model that answered it (`MODELS_FILE`): `cost` is exact (`numeric`, never a float, so the
-- usage sums add up to the last digit) in `currency` (e.g. `USD`). Both stay null on user
-- messages, on replies of a model without prices, on replies whose usage the provider did not
-- report, and on every row saved before this: a price is not known after the fact.
-- Nullable with no default: adding them rewrites nothing, however large the table.
alter table ai_messages add column cost numeric, add column currency text;
