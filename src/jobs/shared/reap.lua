-- Puts every expired lease's operation back in `due` (if still pending), on Redis's own clock. ARGV: the key
-- prefix.
local p = ARGV[1]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local expired = redis.call('ZRANGEBYSCORE', p .. ':leases', '-inf', now)
for _, m in ipairs(expired) do
  redis.call('ZREM', p .. ':leases', m)
  local id, n = string.match(m, '^(.*):(%d+)$')
  local raw = redis.call('HGET', p .. ':ops:' .. id, n)
  if raw then
    local op = cjson.decode(raw)
    if op.state == 'pending' then redis.call('ZADD', p .. ':due:' .. op.route, 0, m) end
  end
end
return #expired
