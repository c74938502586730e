-- Moves operations due at ARGV[1] from each of an app's routes' `due` (KEYS but the last), at most ARGV[2 + k]
-- of KEYS[k], to the app's `leases` (the last KEY) for ARGV[2] ms, on Redis's own clock (so replicas' clocks do
-- not matter); returns them. Per route, so that one route's long job never holds back the others.
local t = redis.call('TIME')
local lease_until = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[2])
local leases, claimed = KEYS[#KEYS], {}
for k = 1, #KEYS - 1 do
  local due = redis.call('ZRANGEBYSCORE', KEYS[k], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2 + k]))
  for _, m in ipairs(due) do
    redis.call('ZREM', KEYS[k], m)
    redis.call('ZADD', leases, lease_until, m)
    claimed[#claimed + 1] = m
  end
end
return claimed
