//! The semaphore's scripts: its permits in a hash at the lock key, the
//! mutex's line and hand-over reused (see the parent module).

use std::sync::LazyLock;

use redis::Script;

use super::election::resign_lua;
use super::readers::{RELEASE_READER_LUA, admit_waiters_lua};
use super::{RELEASE_LOCK_LUA, WRITER_PLACE, hand_over_lua_granting, take_place_lua};

/// The semaphore's hand-over: the reservation is one more permit in the
/// hash at `KEYS[1]` (`owner -> end:token`, server ms), and the hash lasts
/// at least as long as it. Defines `hand_over_permit()`.
pub(super) fn hand_over_permit_lua() -> String {
    hand_over_lua_granting(
        "hand_over_permit",
        "redis.call('HSET', KEYS[1], waiter, (now + px) .. ':' .. token)
        if redis.call('PTTL', KEYS[1]) < px then redis.call('PEXPIRE', KEYS[1], px) end",
    )
}

/// Lua for leases kept in a hash at `KEYS[1]`: a semaphore's permits
/// (field `limit` the limit) or a read lock's readers (field `readers`
/// marks it), and one field per holder, `owner -> end:token` (`end` in the
/// server's ms, from `TIME`: expiry is decided by the server's clock). The
/// hash's own TTL is at least its longest lease's (a release sets it to
/// the last end left), so it vanishes with its holders even if nobody
/// comes back. `live_permits(now)` removes the leases that ran out and
/// returns the number left, the limit (none for readers), the end of the
/// first and of the last to end, the token of `ARGV[1]`'s lease, and
/// whether the hash is a read lock's; `'foreign'` in place of the count
/// when a field is not dlock's, `'election'` when the hash is an
/// election's leader (see `election.rs`).
pub(super) const PERMITS_LUA: &str = r"
local function server_now()
  local time = redis.call('TIME')
  return tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
end
local function live_permits(now)
  local fields = redis.call('HGETALL', KEYS[1])
  local held, limit, first_end, last_end, mine, shared = 0, nil, nil, 0, nil, false
  local elected = false
  for i = 1, #fields, 2 do
    local field, value = fields[i], fields[i + 1]
    if field == 'limit' then
      limit = tonumber(value)
    elseif field == 'readers' then
      shared = true
    elseif field == 'leader' or field == 'term' or field == 'value' then
      elected = true
    else
      local ends, token = string.match(value, '^(%d+):(%d+)$')
      if not ends then return 'foreign' end
      ends = tonumber(ends)
      if ends <= now then
        redis.call('HDEL', KEYS[1], field)
      else
        held = held + 1
        if field == ARGV[1] then mine = token end
        if not first_end or ends < first_end then first_end = ends end
        if ends > last_end then last_end = ends end
      end
    end
  end
  if elected then return 'election' end
  if (not limit) == (not shared) and #fields > 0 then return 'foreign' end
  return held, limit, first_end, last_end, mine, shared
end
";

/// Lua for the releases of leases kept in a hash (needs `PERMITS_LUA`):
/// `end_lease(value, now)` removes `ARGV[1]`'s lease, whose field held
/// `value`, and says whether it was still live (1) or not (0);
/// `leave_line()` removes `ARGV[1]`'s place in line, if it has one.
pub(super) const LEAVING_LUA: &str = r"
local function end_lease(value, now)
  redis.call('HDEL', KEYS[1], ARGV[1])
  local ends = tonumber(string.match(value, '^(%d+):') or '0')
  if ends > now then return 1 end
  return 0
end
local function leave_line()
  if redis.pcall('HDEL', KEYS[4], ARGV[1]) == 1 then
    redis.pcall('LREM', KEYS[3], 1, ARGV[1])
  end
end
";

/// Lua for a semaphore's release: `release_permit()`: if `ARGV[1]` holds
/// a permit, remove it; if not, remove its place in line. Then hand every
/// free permit to the waiters in line, first come first served (a release
/// frees one; permits that ran out while the waiters slept free more).
/// Returns the first hand-over message when `ARGV[1]`'s permit was live
/// and a waiter got it, 1 released, 0 no live permit, -1 the key is not a
/// semaphore.
const RELEASE_PERMIT_LUA: &str = r"
local function release_permit()
  local kind = redis.call('TYPE', KEYS[1])['ok']
  if kind ~= 'hash' then
    leave_line()
    if kind == 'none' then return 0 end
    return -1
  end
  local now = server_now()
  local released = 0
  local value = redis.call('HGET', KEYS[1], ARGV[1])
  if value then
    released = end_lease(value, now)
  else
    leave_line()
  end
  local held, limit = live_permits(now)
  if held == 'foreign' or not limit then return -1 end
  local handed = false
  while limit and held < limit do
    local message = hand_over_permit()
    if not message then break end
    handed = handed or message
    held = held + 1
  end
  if held == 0 then redis.call('DEL', KEYS[1]) end
  if released == 1 and handed then return handed end
  return released
end
";

/// A semaphore permit's release; see `release_permit` above. Keys and
/// arguments as for [`RELEASE_TO_NEXT`].
pub(crate) static RELEASE_PERMIT: LazyLock<Script> = LazyLock::new(|| {
    let hand_over = hand_over_permit_lua();
    Script::new(&format!(
        "{PERMITS_LUA}{LEAVING_LUA}{hand_over}{RELEASE_PERMIT_LUA}\nreturn release_permit()\n"
    ))
});

/// The clean-up after a request that ended without a guard, which does not
/// know what the key is: a mutex's (or writer's) lock or place (a string at
/// the key), a reader's lease or place (a hash marked `readers`), an
/// election's leader (a hash with a `leader`), or a semaphore's permit or
/// place. With nothing at the key, the waiters in
/// line may be a semaphore's, whom a mutex's hand-over must not serve: only
/// the place is removed, and the waiters' next attempts take the key.
/// Keys and arguments as for [`RELEASE_TO_NEXT`](super::RELEASE_TO_NEXT).
pub(crate) static ABANDON: LazyLock<Script> = LazyLock::new(|| {
    let (admit, permit, resign) = (admit_waiters_lua(), hand_over_permit_lua(), resign_lua());
    Script::new(&format!(
        r"{PERMITS_LUA}{LEAVING_LUA}{admit}{permit}{resign}{RELEASE_LOCK_LUA}{RELEASE_PERMIT_LUA}{RELEASE_READER_LUA}
local kind = redis.call('TYPE', KEYS[1])['ok']
if kind == 'string' then return release_lock() end
if kind == 'hash' and redis.call('HEXISTS', KEYS[1], 'readers') == 1 then return release_reader() end
if kind == 'hash' and redis.call('HEXISTS', KEYS[1], 'leader') == 1 then return resign() end
return release_permit()
"
    ))
});

/// Take one of a semaphore's permits if fewer than `ARGV[7]` are held
/// (bumping the fencing counter), re-grant a permit to the same owner, or
/// report when the first permit ends. Keys and `ARGV[1..6]` as in
/// [`ACQUIRE`](super::ACQUIRE), with the same replies, plus `mutex` when
/// the key holds a mutex's lock, `readers` when it holds a read lock's
/// readers, `election` when it holds an election's leader and `limit:N`
/// when its permits were taken with limit N.
pub(crate) static ACQUIRE_PERMIT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        r"{PERMITS_LUA}
local kind = redis.call('TYPE', KEYS[1])['ok']
if kind == 'string' then
  local holder = redis.call('GET', KEYS[1])
  if string.len(holder) == 32 and not string.find(holder, '[^0-9a-f]') then return 'mutex' end
  return 'foreign'
end
if kind ~= 'none' and kind ~= 'hash' then return 'wrongtype' end
local permits = tonumber(ARGV[7])
local now = server_now()
local held, limit, first_end, last_end, mine, shared = live_permits(now)
if held == 'foreign' or held == 'election' then return held end
if shared then
  if held > 0 then return 'readers' end
  redis.call('DEL', KEYS[1])
  held, last_end = 0, 0
end
if held > 0 and limit ~= permits then return 'limit:' .. limit end
if mine or held < permits then
  local token = mine
  if not token then
    token = redis.pcall('INCR', KEYS[2])
    if type(token) == 'table' then return 'counter' end
  end
  local ends = now + tonumber(ARGV[2])
  redis.call('HSET', KEYS[1], ARGV[1], ends .. ':' .. token, 'limit', permits)
  redis.call('PEXPIRE', KEYS[1], math.max(ends, last_end) - now)
  if ARGV[3] == 'queued' then
    redis.pcall('HDEL', KEYS[4], ARGV[1])
    redis.pcall('LREM', KEYS[3], 1, ARGV[1])
  end
  return tonumber(token)
end
if ARGV[3] ~= '' then
  local deadline = now + tonumber(ARGV[4])
  {take_place}
end
return -1 - (first_end - now)
",
        take_place = take_place_lua(WRITER_PLACE)
    ))
});

/// Reset a permit's end to now + `ARGV[2]` ms if `ARGV[1]` still holds it.
/// Returns 1 extended, 0 no live permit, -1 the key is not a semaphore.
pub(crate) static EXTEND_PERMIT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        r"{PERMITS_LUA}
local kind = redis.call('TYPE', KEYS[1])['ok']
if kind == 'none' then return 0 end
if kind ~= 'hash' then return -1 end
local value = redis.call('HGET', KEYS[1], ARGV[1])
if not value then return 0 end
local ends, token = string.match(value, '^(%d+):(%d+)$')
local now = server_now()
if not ends or tonumber(ends) <= now then
  redis.call('HDEL', KEYS[1], ARGV[1])
  return 0
end
redis.call('HSET', KEYS[1], ARGV[1], (now + tonumber(ARGV[2])) .. ':' .. token)
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[2]) then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 1
"
    ))
});
