-- Settles a job's state after a cancel (ARGV: the key prefix, id, now).
if redis.call('EXISTS', ARGV[1] .. ':job:' .. ARGV[2]) == 1 then settle(ARGV[1], ARGV[2], tonumber(ARGV[3])) end
return 0
