//! The election's scripts. The leader's lease is a hash at the lock key
//! with a PX TTL (expiry by the server's clock, as for a mutex): `leader`
//! the owner token (which marks the hash as an election's), `term` its
//! fencing token from the key's counter, `value` the public value.
//!
//! Candidates do not stand in the mutex's line: every change (a candidate
//! elected, a proclamation, a resignation) is published on the key's
//! release channel, which wakes the waiting candidates and the observers
//! alike; the first candidate to run its script after a change leads.

use std::sync::LazyLock;

use redis::Script;

use super::RELEASED;

/// Lua that tells what a key that is not an election's holds, for the
/// typed refusals: `other_kind(kind)` (with `kind` the key's `TYPE`)
/// returns `mutex`, `semaphore:N`, `readers`, `wrongtype` or `foreign`.
fn other_kind_lua() -> &'static str {
    r"
local function other_kind(kind)
  if kind == 'string' then
    local holder = redis.call('GET', KEYS[1])
    if string.len(holder) == 32 and not string.find(holder, '[^0-9a-f]') then return 'mutex' end
    return 'foreign'
  end
  if kind ~= 'hash' then return 'wrongtype' end
  local limit = redis.call('HGET', KEYS[1], 'limit')
  if limit then return 'semaphore:' .. limit end
  if redis.call('HEXISTS', KEYS[1], 'readers') == 1 then return 'readers' end
  return 'foreign'
end
"
}

/// Lua that announces a change of the election on its release channel
/// (the lock key's name with the channel's suffix): `announce(what)`.
fn announce_lua() -> String {
    format!(
        r"
local function announce(what)
  redis.call('PUBLISH', KEYS[1] .. '{RELEASED}', what)
end
"
    )
}

/// Lead if nobody leads (bumping the fencing counter: the new term), lead
/// again for the same owner (a retried request), or report how long the
/// leader's lease lasts. `KEYS[1]` the lock key, `KEYS[2]` the counter;
/// `ARGV[1]` owner, `ARGV[2]` TTL in ms, `ARGV[3]` the value. Replies as
/// the mutex's [`ACQUIRE`](super::ACQUIRE), plus `mutex`, `readers` and
/// `semaphore:N` for a key in use as another kind.
pub(crate) static ELECT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        r"{other_kind}{announce}
local kind = redis.call('TYPE', KEYS[1])['ok']
if kind == 'none' then
  local token = redis.pcall('INCR', KEYS[2])
  if type(token) == 'table' then return 'counter' end
  redis.call('HSET', KEYS[1], 'leader', ARGV[1], 'term', token, 'value', ARGV[3])
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  announce('elected')
  return token
end
local leader = kind == 'hash' and redis.call('HGET', KEYS[1], 'leader')
if not leader then return other_kind(kind) end
if leader == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return tonumber(redis.call('HGET', KEYS[1], 'term')) or 'counter'
end
return -1 - redis.call('PTTL', KEYS[1])
",
        other_kind = other_kind_lua(),
        announce = announce_lua(),
    ))
});

/// Lua for the owner-checked steps on a leader's lease: `leading()` is 1
/// when `ARGV[1]` leads, 0 when nobody does, -1 when someone else does or
/// the key is not an election's.
const LEADING_LUA: &str = r"
local function leading()
  local leader = redis.pcall('HGET', KEYS[1], 'leader')
  if leader == ARGV[1] then return 1 end
  if type(leader) ~= 'table' and redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
  return -1
end
";

/// Lua for a leader's resignation: `resign()` deletes the lease if
/// `ARGV[1]` leads and announces it; returns as `leading()`.
pub(super) fn resign_lua() -> String {
    format!(
        r"{LEADING_LUA}{announce}
local function resign()
  local status = leading()
  if status == 1 then
    redis.call('DEL', KEYS[1])
    announce('resigned')
  end
  return status
end
",
        announce = announce_lua(),
    )
}

/// Resign if `ARGV[1]` leads. Returns 1 resigned, 0 nobody led, -1
/// another owner leads.
pub(crate) static RESIGN: LazyLock<Script> = LazyLock::new(|| {
    let resign = resign_lua();
    Script::new(&format!("{resign}\nreturn resign()\n"))
});

/// Reset the leader's lease to `ARGV[2]` ms if `ARGV[1]` leads. Returns
/// as [`RESIGN`].
pub(crate) static EXTEND_LEADER: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        r"{LEADING_LUA}
local status = leading()
if status == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return status
"
    ))
});

/// Set the public value to `ARGV[2]` if `ARGV[1]` leads, and announce it.
/// Returns as [`RESIGN`].
pub(crate) static PROCLAIM: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        r"{LEADING_LUA}{announce}
local status = leading()
if status == 1 then
  redis.call('HSET', KEYS[1], 'value', ARGV[2])
  announce('proclaimed')
end
return status
",
        announce = announce_lua(),
    ))
});

/// The leader: `{term, value, remaining ms}`, an empty table when nobody
/// leads, or (as [`ELECT`]) the kind the key is in use as. Reads only.
pub(crate) static LEADER: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        r"{other_kind}
local kind = redis.call('TYPE', KEYS[1])['ok']
if kind == 'none' then return {{}} end
local fields = kind == 'hash' and redis.call('HMGET', KEYS[1], 'leader', 'term', 'value')
if not fields or not fields[1] then return other_kind(kind) end
return {{tonumber(fields[2]) or 0, fields[3] or '', redis.call('PTTL', KEYS[1])}}
",
        other_kind = other_kind_lua(),
    ))
});
