-- The job's state from its counters, kept in the per-state totals; a job whose last operation finished gets its
-- end time. Returns the job's duration (ms) if it finished here, else -1.
local function settle(p, id, now)
  local jobk = p .. ':job:' .. id
  local j = redis.call('HMGET', jobk, 'state', 'pending', 'cancel_requested', 'failed', 'finished_ms', 'created_ms')
  local state, pending = j[1], tonumber(j[2])
  local new
  if pending > 0 then new = 'running'
  elseif j[3] == '1' then new = 'cancelled'
  elseif tonumber(j[4]) > 0 then new = 'failed'
  else new = 'done' end
  if new ~= state then
    redis.call('HSET', jobk, 'state', new)
    redis.call('HINCRBY', p .. ':states', state, -1)
    redis.call('HINCRBY', p .. ':states', new, 1)
  end
  if pending == 0 and (not j[5] or j[5] == '') then
    redis.call('HSET', jobk, 'finished_ms', now)
    redis.call('ZADD', p .. ':finished', now, id)
    redis.call('ZREM', p .. ':open', id)
    return now - tonumber(j[6])
  end
  return -1
end
local function left(p, id, op, by)
  redis.call('HINCRBY', p .. ':left:' .. id, 'route:' .. op.route, by)
  if op.user and op.user ~= cjson.null then redis.call('HINCRBY', p .. ':left:' .. id, 'user:' .. op.user, by) end
end
