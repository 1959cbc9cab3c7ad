-- KEYS[1]: the worker set
-- KEYS[2]: the active job list
-- KEYS[3]: the signal list
-- KEYS[4]: The workers key prefix
-- ARGV[1]: the timestamp before which a worker is considered expired
-- ARGV[2]: (optional) restrict to this specific worker only
-- Returns: number of jobs processed
-- PATCHED (vendored copy): Lua's unpack() fails with "too many results to unpack" above
-- ~8,000 values (LUAI_MAXCSTACK); push the ids in slices of at most CHUNK.
local CHUNK = 1000
local function rpush_chunked(key, ids)
    for from = 1, #ids, CHUNK do
        redis.call("rpush", key, unpack(ids, from, math.min(from + CHUNK - 1, #ids)))
    end
end

local worker_key_prefix = KEYS[4]

local workers
if ARGV[2] then
    -- Only consider this worker if it is in fact expired
    local score = redis.call("zscore", KEYS[1], ARGV[2])
    if score and tonumber(score) <= tonumber(ARGV[1]) then
        workers = {ARGV[2]}
    else
        workers = {}
    end
else
    workers = redis.call("zrangebyscore", KEYS[1], 0, ARGV[1])
end

redis.replicate_commands()

local processed = 0

for _, worker in ipairs(workers) do
    local inflight_set_key = worker_key_prefix .. ":" .. worker
    local jobs = redis.call("smembers", inflight_set_key)
    local count = table.getn(jobs)

    if count > 0 then
        rpush_chunked(KEYS[2], jobs)
        redis.call("del", inflight_set_key)
        processed = processed + count
    end

    redis.call("zrem", KEYS[1], worker)
    -- PATCHED (vendored copy): the worker's metadata hash (`register_worker.lua`) goes with
    -- it; every consumer start registers a name of its own, so it was kept forever.
    redis.call("del", KEYS[1] .. ":metadata:" .. worker)
end

if processed > 0 then
    redis.call("del", KEYS[3])
    redis.call("lpush", KEYS[3], 1)
end

return processed
