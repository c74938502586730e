-- Moves up to ARGV[2] operations of each route due at ARGV[1] from that route's `due` (KEYS but the last) to
-- `leases` (the last KEY) for ARGV[3] ms, on Redis's own clock (so replicas' clocks do not matter); returns
-- them. Per route, so that one route's long job never holds back the others.
local t = redis.call('TIME')
local lease_until = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[3])
local leases, claimed = KEYS[#KEYS], {}
for k = 1, #KEYS - 1 do
  local due = redis.call('ZRANGEBYSCORE', KEYS[k], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
  for _, m in ipairs(due) do
    redis.call('ZREM', KEYS[k], m)
    redis.call('ZADD', leases, lease_until, m)
    claimed[#claimed + 1] = m
  end
end
return claimed
