-- Records outcomes. ARGV: the key prefix, now, then per outcome: id, n, next (`retry` or a final state),
-- attempts, status, error, description, due-again time, the attempt's note (JSON; empty: nothing was attempted).
-- Returns the durations of the jobs finished here.
local p, now = ARGV[1], tonumber(ARGV[2])
local finished = {}
local i = 3
while i <= #ARGV do
  local id, n, next, attempts = ARGV[i], ARGV[i + 1], ARGV[i + 2], tonumber(ARGV[i + 3])
  local status, err, desc, at, note = ARGV[i + 4], ARGV[i + 5], ARGV[i + 6], ARGV[i + 7], nil
  if ARGV[i + 8] ~= '' then note = cjson.decode(ARGV[i + 8]) end
  i = i + 9
  -- cjson writes an empty table as `{}`, which is no array: an empty `audit_seqs` is left out (it reads as empty).
  if note and type(note.audit_seqs) == 'table' and #note.audit_seqs == 0 then note.audit_seqs = nil end
  local member, opsk = id .. ':' .. n, p .. ':ops:' .. id
  redis.call('ZREM', p .. ':leases', member)
  local raw = redis.call('HGET', opsk, n)
  if raw then
    local op = cjson.decode(raw)
    local was = op.state
    local function fill()
      op.attempts = attempts
      if status ~= '' then op.status = tonumber(status) else op.status = cjson.null end
      if err ~= '' then op.error = err else op.error = cjson.null end
      if desc ~= '' then op.error_description = desc else op.error_description = cjson.null end
      -- Created with its first note, so never empty (which cjson would write as `{}`).
      if note then
        if type(op.history) ~= 'table' then op.history = {} end
        op.history[#op.history + 1] = note
      end
    end
    if next == 'retry' then
      -- Once per attempt: the same outcome sent again (its first answer lost) changes nothing. An operation
      -- cancelled while in flight keeps the attempt, but is not due again.
      if (was == 'pending' or was == 'cancelled') and (tonumber(op.attempts) or 0) < attempts then
        fill()
        redis.call('HSET', opsk, n, cjson.encode(op))
        if was == 'pending' then redis.call('ZADD', p .. ':due:' .. op.route, at, member) end
      end
    elseif was == 'pending' or was == 'cancelled' then
      fill()
      op.state, op.finished_ms = next, now
      redis.call('HSET', opsk, n, cjson.encode(op))
      redis.call('ZREM', p .. ':due:' .. op.route, member)
      redis.call('HINCRBY', p .. ':job:' .. id, was, -1)
      redis.call('HINCRBY', p .. ':job:' .. id, next, 1)
      if was == 'pending' then left(p, id, op, -1) end
    end
    if redis.call('EXISTS', p .. ':job:' .. id) == 1 then
      local took = settle(p, id, now)
      if took >= 0 then finished[#finished + 1] = took end
    end
  end
end
return finished
