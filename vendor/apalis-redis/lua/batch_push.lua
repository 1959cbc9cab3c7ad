-- KEYS[1]: the task data hash
-- KEYS[2]: the active task list
-- KEYS[3]: the signal list
-- KEYS[4]: the metadata prefix (e.g. "task_meta")
-- KEYS[5]: the scheduled set (for delayed tasks)
-- KEYS[6]: the idempotency key set (e.g. "task_idempotency")

-- ARGV[1]: the idempotency_ttl (seconds; 0: the keys do not expire)
-- ARGV[2]: emit pubsub events
-- ARGV[3]: P, how many messages to publish once the tasks are pushed
-- ARGV[4]: a channel on which to publish an empty message once the tasks are pushed, only if
--          this push queued a task and no task was waiting or due before it ("" for none): it
--          wakes the consumers that found the queue empty, and costs nothing under a backlog
-- ARGV[5]: now, by the pushing client's clock (seconds): a task whose schedule time is not
--          after it is due and goes straight to the active list
-- ARGV[6..5+2P]: [channel1, message1, channel2, message2, ...]
-- ARGV[6+2P..]: [task_id1, task_data1, attempts1, max_attempts1, metadata_json1, schedule_time1, idempotency_key1,
--        task_id2, task_data2, attempts2, max_attempts2, metadata_json2, schedule_time2, idempotency_key2, ...]

-- PATCHED (vendored copy): upstream puts every task in the scheduled set (its schedule time is
-- never before now), and each fetch then moves it to the active list: a `zadd` here and a
-- `zrangebyscore`, `rpush` and `zrem` there for every task. A due task is pushed onto the
-- active list here, all of a run's in one `rpush`, and its idempotency key is claimed with
-- one `set ... nx ex` where upstream ran `setnx` and `expire`.
local newly_enqueued = 0
local newly_scheduled = 0

local idempotency_ttl = tonumber(ARGV[1]) or 0
local emit_events = ARGV[2] == "1"
local first_publish = 6
local first_task = first_publish + 2 * tonumber(ARGV[3])
local now = tonumber(ARGV[5])

-- Whether no task waits or is due before this push.
local wake = ARGV[4]
local was_idle = false
if #wake > 0 then
    was_idle = redis.call("llen", KEYS[2]) == 0 and redis.call("zcount", KEYS[5], 0, now) == 0
end

-- At most this many ids per `rpush`: Lua's unpack() takes ~8,000 values at most.
local CHUNK = 1000
local due = {}

for i = first_task, #ARGV, 7 do
    local task_id = ARGV[i]
    local task_data = ARGV[i + 1]
    local attempts = ARGV[i + 2]
    local max_attempts = ARGV[i + 3]
    local metadata_json = ARGV[i + 4]
    local schedule_time = tonumber(ARGV[i + 5])
    local idempotency_key = ARGV[i + 6] -- empty string "" means no idempotency key

    if task_id and task_data then

        -- If an idempotency key is provided, attempt to claim it; a key already set means
        -- this task was already submitted.
        local allowed = true
        if idempotency_key and #idempotency_key > 0 then
            local idem_field = KEYS[6] .. ':' .. idempotency_key
            if idempotency_ttl > 0 then
                allowed = redis.call("set", idem_field, task_id, "nx", "ex", idempotency_ttl) ~= false
            else
                allowed = redis.call("set", idem_field, task_id, "nx") ~= false
            end
        end

        if allowed then
            local set = redis.call("hsetnx", KEYS[1], task_id, task_data)

            if set == 1 then
                local meta_key = KEYS[4] .. ':' .. task_id

                -- Base metadata, with the idempotency key for traceability
                local meta = {"attempts", tonumber(attempts), "max_attempts", tonumber(max_attempts), "status",
                              "Pending", "idempotency_key", idempotency_key}

                -- Merge in any JSON metadata
                if metadata_json and #metadata_json > 0 and metadata_json ~= "{}" then
                    local ok, decoded = pcall(cjson.decode, metadata_json)
                    if ok and type(decoded) == "table" then
                        for k, v in pairs(decoded) do
                            if type(v) == "table" then
                                v = cjson.encode(v)
                            end
                            table.insert(meta, k)
                            table.insert(meta, tostring(v))
                        end
                    end
                end

                redis.call("hmset", meta_key, unpack(meta))

                if schedule_time and now and schedule_time > now then
                    redis.call("zadd", KEYS[5], schedule_time, task_id)
                    newly_scheduled = newly_scheduled + 1
                else
                    due[#due + 1] = task_id
                    if emit_events then
                        redis.call("publish", "tasks:" .. KEYS[2] .. ':available', task_id)
                    end
                end
            end
        end
    end
end

for from = 1, #due, CHUNK do
    redis.call("rpush", KEYS[2], unpack(due, from, math.min(from + CHUNK - 1, #due)))
end
newly_enqueued = #due

if newly_enqueued > 0 then
    redis.call("del", KEYS[3])
    redis.call("lpush", KEYS[3], 1)
end

-- Only once every task is pushed: a run that failed before here published nothing.
for i = first_publish, first_task - 1, 2 do
    redis.call("publish", ARGV[i], ARGV[i + 1])
end
if was_idle and newly_enqueued + newly_scheduled > 0 then
    redis.call("publish", wake, "")
end

return {newly_enqueued, newly_scheduled}
