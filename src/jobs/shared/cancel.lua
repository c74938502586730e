-- Cancels a range of a job's operations: those still pending (claimed or not) are dropped. ARGV: the key prefix,
-- id, now, the first and the last index of the range; a range keeps each call short for a job of any size.
-- Returns how many were dropped.
local p, id, now = ARGV[1], ARGV[2], tonumber(ARGV[3])
local jobk, opsk = p .. ':job:' .. id, p .. ':ops:' .. id
if redis.call('EXISTS', jobk) == 0 then return 0 end
redis.call('HSET', jobk, 'cancel_requested', '1')
local dropped = 0
for n = tonumber(ARGV[4]), tonumber(ARGV[5]) do
  local raw = redis.call('HGET', opsk, tostring(n))
  if raw then
    local op = cjson.decode(raw)
    if op.state == 'pending' then
      op.state, op.finished_ms = 'cancelled', now
      redis.call('HSET', opsk, tostring(n), cjson.encode(op))
      redis.call('ZREM', p .. ':due:' .. op.route, id .. ':' .. n)
      left(p, id, op, -1)
      dropped = dropped + 1
    end
  end
end
if dropped > 0 then
  redis.call('HINCRBY', jobk, 'pending', 0 - dropped)
  redis.call('HINCRBY', jobk, 'cancelled', dropped)
end
return dropped
