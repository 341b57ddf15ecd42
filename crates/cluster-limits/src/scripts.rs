//! The Lua scripts, run with EVALSHA (loaded on first use). Each reads Redis's clock, so the
//! instances' clocks never enter a decision.

/// Milliseconds on Redis's clock, as a Lua local `now_ms`.
macro_rules! now_ms {
    () => {
        "local t = redis.call('TIME')\nlocal now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)\n"
    };
}

/// KEYS[1]: the destination's lease set, KEYS[2]: its "wanted" flag. ARGV: lease id, cap,
/// ttl (ms), how long the flag lasts (ms). Returns 1 when the lease is held (taken now, or
/// already held: a retried call), else 0 and sets the flag: someone waits, so instances
/// holding idle sessions of the destination close them.
pub(crate) const ACQUIRE: &str = concat!(
    now_ms!(),
    r#"
local ttl = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now_ms)
if redis.call('ZSCORE', KEYS[1], ARGV[1])
    or redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[2]) then
  redis.call('ZADD', KEYS[1], now_ms + ttl, ARGV[1])
  redis.call('PEXPIRE', KEYS[1], ttl)
  return 1
end
redis.call('SET', KEYS[2], '1', 'PX', tonumber(ARGV[4]))
return 0
"#
);

/// KEYS[1]: the destination's lease set. ARGV: lease id. Returns 1 if it was held.
pub(crate) const RELEASE: &str = concat!(
    now_ms!(),
    r#"
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now_ms)
return redis.call('ZREM', KEYS[1], ARGV[1])
"#
);

/// KEYS[1]: the destination's lease set. ARGV: ttl (ms), cap, lease ids...
/// Extends each lease to now + ttl. A lease that is gone (expired while Redis was out of
/// reach, or Redis restarted empty) is taken again if the cap allows; the ids that could not
/// be are returned: those sessions hold no lease any more.
pub(crate) const RENEW: &str = concat!(
    now_ms!(),
    r#"
local ttl = tonumber(ARGV[1])
local cap = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now_ms)
local lost = {}
for i = 3, #ARGV do
  if redis.call('ZSCORE', KEYS[1], ARGV[i]) or redis.call('ZCARD', KEYS[1]) < cap then
    redis.call('ZADD', KEYS[1], now_ms + ttl, ARGV[i])
  else
    table.insert(lost, ARGV[i])
  end
end
redis.call('PEXPIRE', KEYS[1], ttl)
return lost
"#
);

/// KEYS[1]: the rate's TAT (µs on Redis's clock). ARGV: emission interval (µs), burst
/// tolerance (µs). The standard GCRA: a request at `now` is allowed when
/// `now >= TAT - tolerance`, and then moves TAT to `max(TAT, now) + interval`. Returns 0 when
/// allowed (the permit is taken), else the µs to wait before asking again (nothing taken).
pub(crate) const GCRA: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local allow_at = tat - tolerance
if now < allow_at then
  return allow_at - now
end
local new_tat = tat + interval
redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', math.ceil((new_tat - now) / 1000) + 1)
return 0
"#;
