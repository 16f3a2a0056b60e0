//! The read-write lock's scripts. The writer is the mutex (a string at the
//! lock key); readers are leases in a hash at the lock key, as a
//! semaphore's permits are (`owner -> end:token`, and the field `readers`
//! marking it). Readers and writers wait in the mutex's line; a reader's
//! place is marked (see [`READER_PLACE`](super::READER_PLACE)), so that a
//! release hands the key on by kind: the readers at the head of the line
//! together, or one writer once no reader is left.

use std::sync::LazyLock;

use redis::Script;

use super::permits::{LEAVING_LUA, PERMITS_LUA};
use super::{HAND_OVER_MESSAGE_LUA, READER_PLACE, take_place_lua};

/// Lua shared by every script that frees a mutex's or a read-write lock's
/// key: `admit_waiters(held)`,
/// with `held` the readers that hold the key now (0: nobody holds it and
/// the key is gone), hands the key on to the waiters at the head of the
/// line, first come first served. Readers there join the readers holding
/// it; a writer gets it only when nobody holds it, and ends the round.
/// Each gets a reservation of `min(its TTL, ARGV[2] ms)` with a new
/// fencing token and is told on its client's channel (the message of
/// `HAND_OVER_MESSAGE_LUA`). Waiters whose places ran out are dropped on
/// the way. Returns the messages sent (empty when nobody got the key).
pub(super) fn admit_waiters_lua() -> String {
    format!(
        r"
local function admit_waiters(held)
  local sent, now = {{}}, nil
  while true do
    local waiter = redis.pcall('LINDEX', KEYS[3], 0)
    if type(waiter) ~= 'string' then return sent end
    local place = redis.pcall('HGET', KEYS[4], waiter)
    local mark, deadline, ttl, attempt, channel
    if type(place) == 'string' then
      mark, deadline, ttl, attempt, channel = string.match(place, '^({READER_PLACE}?)(%d+):(%d+):(%d+):(.+)$')
    end
    if not now then
      local time = redis.call('TIME')
      now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
    end
    local live = deadline and tonumber(deadline) >= now
    local reader = mark == '{READER_PLACE}'
    -- A writer waits for the readers holding the key.
    if live and not reader and held > 0 then return sent end
    redis.call('LPOP', KEYS[3])
    redis.pcall('HDEL', KEYS[4], waiter)
    if live then
      local token = redis.pcall('INCR', KEYS[2])
      -- A broken counter: nobody gets the key; each waiter's next attempt reports it.
      if type(token) == 'table' then return sent end
      local px = math.min(tonumber(ttl), tonumber(ARGV[2]))
      if reader then
        redis.call('HSET', KEYS[1], waiter, (now + px) .. ':' .. token, 'readers', '1')
        if redis.call('PTTL', KEYS[1]) < px then redis.call('PEXPIRE', KEYS[1], px) end
      else
        redis.call('SET', KEYS[1], waiter, 'PX', px)
      end
      held = held + 1
      local message = {HAND_OVER_MESSAGE_LUA}
      redis.call('PUBLISH', channel, message)
      sent[#sent + 1] = message
      if not reader then return sent end
    end
  end
end
"
    )
}

/// Lua for a reader's release (needs `PERMITS_LUA` and `LEAVING_LUA`):
/// `release_reader()`: if `ARGV[1]` reads,
/// end its lease; if not, remove its place in line. Then hand the key on
/// (`admit_waiters`): to the readers at the head of the line, or, once no
/// reader is left, to the writer there. Returns the hand-over messages
/// when `ARGV[1]`'s lease was live and waiters got the key, 1 released, 0
/// no live lease, -1 the key is not a read lock's (a writer holds it).
pub(super) const RELEASE_READER_LUA: &str = r"
local function release_reader()
  -- An error: the key is not a hash (a writer holds it, or it is not ours).
  local value = redis.pcall('HGET', KEYS[1], ARGV[1])
  if type(value) == 'string' and redis.call('HLEN', KEYS[1]) == 2 then
    -- The only reader (its lease and the mark): the hash lasts as long as
    -- its longest lease, so while it is here this lease kept writers out.
    redis.call('DEL', KEYS[1])
    local sent = admit_waiters(0)
    if #sent > 0 then return sent end
    return 1
  end
  if type(value) == 'table' or not value then
    leave_line()
    if type(value) == 'table' then return -1 end
    if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
  end
  local now = server_now()
  local released = 0
  if value then released = end_lease(value, now) end
  local held, last_end = 0, 0
  -- Our lease gone and only the `readers` mark left: no reader is left.
  if not value or redis.call('HLEN', KEYS[1]) > 1 then
    local _, shared
    held, _, _, last_end, _, shared = live_permits(now)
    if held == 'foreign' or not shared then return -1 end
  end
  if held == 0 then
    redis.call('DEL', KEYS[1])
  else
    -- The hash lasts as long as its last reader: a writer that finds it
    -- busy comes back when it ends.
    redis.call('PEXPIRE', KEYS[1], last_end - now)
  end
  local sent = admit_waiters(held)
  if released == 1 and #sent > 0 then return sent end
  return released
end
";

/// A reader's release; see `release_reader` above. Keys and arguments as
/// for [`RELEASE_TO_NEXT`](super::RELEASE_TO_NEXT).
pub(crate) static RELEASE_SHARED: LazyLock<Script> = LazyLock::new(|| {
    let admit = admit_waiters_lua();
    Script::new(&format!(
        "{PERMITS_LUA}{LEAVING_LUA}{admit}{RELEASE_READER_LUA}\nreturn release_reader()\n"
    ))
});

/// Take a read lock when no writer holds the key and none waits ahead of
/// this reader (writer preference: a reader that is not in line yet is
/// kept out by any live writer's place), re-grant it to the same owner
/// (a retried request, or a release handed it over), or report how long
/// to wait. Keys and `ARGV[1..6]` as in [`ACQUIRE`](super::ACQUIRE), with
/// the same replies, plus `semaphore:N` when the key holds a semaphore's
/// permits and `election` when it holds an election's leader. The line is
/// read even by a single attempt (mode empty), which never queues.
pub(crate) static ACQUIRE_SHARED: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        r"{PERMITS_LUA}
-- The deadline of the place of the first live writer ahead of ARGV[1] in
-- line (anywhere in line when ARGV[1] has no place), or false.
local function writer_ahead(now)
  for _, waiter in ipairs(redis.call('LRANGE', KEYS[3], 0, -1)) do
    if waiter == ARGV[1] then return false end
    local place = redis.call('HGET', KEYS[4], waiter)
    if place then
      local mark, deadline = string.match(place, '^({READER_PLACE}?)(%d+):')
      if mark == '' and tonumber(deadline) >= now then return tonumber(deadline) end
    end
  end
  return false
end
local now = server_now()
if redis.call('EXISTS', KEYS[1], KEYS[3]) == 0 then
  -- Nobody holds the key and nobody waits: the first reader.
  local token = redis.pcall('INCR', KEYS[2])
  if type(token) == 'table' then return 'counter' end
  redis.call('HSET', KEYS[1], ARGV[1], (now + tonumber(ARGV[2])) .. ':' .. token, 'readers', '1')
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return token
end
local kind = redis.call('TYPE', KEYS[1])['ok']
local wait
if kind == 'string' then
  local holder = redis.call('GET', KEYS[1])
  if string.len(holder) ~= 32 or string.find(holder, '[^0-9a-f]') then return 'foreign' end
  -- A writer holds the key.
  wait = redis.call('PTTL', KEYS[1])
elseif kind == 'hash' or kind == 'none' then
  local held, limit, last_end, mine, _ = 0, nil, 0, nil, nil
  if kind == 'hash' then
    held, limit, _, last_end, mine = live_permits(now)
    if held == 'foreign' or held == 'election' then return held end
    if limit then
      if held > 0 then return 'semaphore:' .. limit end
      redis.call('DEL', KEYS[1])
      last_end = 0
    end
  end
  local kept_out = not mine and writer_ahead(now)
  if not kept_out then
    local token = mine
    if not token then
      token = redis.pcall('INCR', KEYS[2])
      if type(token) == 'table' then return 'counter' end
    end
    local ends = now + tonumber(ARGV[2])
    redis.call('HSET', KEYS[1], ARGV[1], ends .. ':' .. token, 'readers', '1')
    redis.call('PEXPIRE', KEYS[1], math.max(ends, last_end) - now)
    if ARGV[3] == 'queued' then
      redis.pcall('HDEL', KEYS[4], ARGV[1])
      redis.pcall('LREM', KEYS[3], 1, ARGV[1])
    end
    return tonumber(token)
  end
  -- The writer ahead goes in when the readers leave, or its place runs out.
  if last_end > now then wait = last_end - now else wait = kept_out - now end
  wait = math.max(wait, 1)
else
  return 'wrongtype'
end
if ARGV[3] ~= '' then
  local deadline = now + tonumber(ARGV[4])
  {take_place}
end
return -1 - wait
",
        take_place = take_place_lua(READER_PLACE)
    ))
});
