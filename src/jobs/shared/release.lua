-- Gives back a claimed operation, due again at ARGV[3], unless it is no longer pending. ARGV[1]: the key prefix,
-- ARGV[2]: the member `id:n`.
local p, m = ARGV[1], ARGV[2]
redis.call('ZREM', p .. ':leases', m)
local id, n = string.match(m, '^(.*):(%d+)$')
local raw = redis.call('HGET', p .. ':ops:' .. id, n)
if raw then
  local op = cjson.decode(raw)
  if op.state == 'pending' then redis.call('ZADD', p .. ':due:' .. op.route, ARGV[3], m) end
end
return 0
