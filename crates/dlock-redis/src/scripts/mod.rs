//! The Lua scripts: each lock operation is one atomic EVALSHA.
//!
//! Keys: `KEYS[1]` is the lock key (value: the owner token, with a PX TTL),
//! `KEYS[2]` the fencing counter; both carry the same `{...}` hash tag, so they
//! live in one Cluster slot.

use std::io::Write as _;
use std::sync::LazyLock;

use redis::{Cmd, FromRedisValue, RedisResult, RedisWrite, Script, ToRedisArgs};

mod election;
mod permits;
mod readers;

pub(crate) use election::{ELECT, EXTEND_LEADER, LEADER, PROCLAIM, RESIGN};

pub(crate) use permits::{ABANDON, ACQUIRE_PERMIT, EXTEND_PERMIT, RELEASE_PERMIT};
use permits::{PERMITS_LUA, hand_over_permit_lua};
use readers::admit_waiters_lua;
pub(crate) use readers::{ACQUIRE_SHARED, RELEASE_SHARED};

/// The Redis key of a lock (no suffix) and of the keys kept beside it:
/// `{prefix}{key}{suffix}`, the user's key as the hash tag.
pub(crate) const LOCK: &str = "";
/// Suffix of the fencing counter's key.
pub(crate) const FENCE: &str = ":fence";
/// Suffix of the line: a list of waiting owners in arrival order.
pub(crate) const LINE: &str = ":line";
/// Suffix of the places: a hash of waiting owner to place.
pub(crate) const PLACES: &str = ":places";
/// Suffix of the channel on which Redlock nodes announce releases.
pub(crate) const RELEASED: &str = ":released";

/// `{prefix}{key}{suffix}` as a `String`, for callers outside the hot path.
pub(crate) fn key_name(prefix: &str, key: &str, suffix: &str) -> String {
    KeyName { prefix, key, suffix }.parts().concat()
}

/// One call of a script, built straight into an EVALSHA command: cheaper
/// on the hot path than redis-rs's `ScriptInvocation`, which copies every
/// key and argument twice. The script is loaded when the server does not
/// know it yet (NOSCRIPT), then called again.
pub(crate) struct ScriptCall {
    script: &'static Script,
    command: Cmd,
}

impl ScriptCall {
    /// A call of `script` on the keys `{prefix}{key}{suffix}`, one per
    /// suffix, written into the command without a `String` each (this runs
    /// twice per lock cycle); add the arguments with [`arg`](Self::arg).
    pub(crate) fn new(script: &'static Script, prefix: &str, key: &str, suffixes: &[&str]) -> Self {
        // Room for every key and the usual arguments (an owner token, a TTL,
        // a short mode or channel), so that the buffer is not grown.
        let key_bytes: usize = suffixes
            .iter()
            .map(|suffix| prefix.len() + key.len() + 2 + suffix.len())
            .sum();
        let mut command = Cmd::with_capacity(3 + suffixes.len() + 6, 64 + key_bytes + 128);
        command.arg("EVALSHA").arg(script.get_hash()).arg(suffixes.len());
        for suffix in suffixes {
            command.arg(KeyName { prefix, key, suffix });
        }
        ScriptCall { script, command }
    }

    pub(crate) fn arg(mut self, argument: impl ToRedisArgs) -> Self {
        self.command.arg(argument);
        self
    }

    pub(crate) async fn run<T: FromRedisValue>(
        &self,
        connection: &mut impl redis::aio::ConnectionLike,
    ) -> RedisResult<T> {
        match self.command.query_async(connection).await {
            Err(error) if error.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
                self.script.load_async(connection).await?;
                self.command.query_async(connection).await
            }
            answer => answer,
        }
    }
}

/// One Redis key name, written into a command piece by piece.
struct KeyName<'a> {
    prefix: &'a str,
    key: &'a str,
    suffix: &'a str,
}

/// Put before a key that starts with `}`: Redis Cluster hashes a name by
/// the text between its first `{` and the next `}`, and an empty tag
/// (`{}`) means the whole name, so the lock and its counter would land in
/// different slots. Valid keys hold no control characters, so no other
/// key's name can start with this one's tag.
const EMPTY_TAG_ESCAPE: &str = "\u{1}";

impl<'a> KeyName<'a> {
    /// The name's pieces, in order: the one place that spells the format.
    /// The hash tag is the key up to its first `}` (the whole key when it
    /// has none), the same for every suffix.
    fn parts(&self) -> [&'a str; 6] {
        let escape = if self.key.starts_with('}') {
            EMPTY_TAG_ESCAPE
        } else {
            ""
        };
        [self.prefix, "{", escape, self.key, "}", self.suffix]
    }
}

impl ToRedisArgs for KeyName<'_> {
    fn write_redis_args<W: ?Sized + RedisWrite>(&self, out: &mut W) {
        let mut arg = out.writer_for_next_arg();
        for part in self.parts() {
            // Writing into the command's own buffer cannot fail.
            let _ = arg.write_all(part.as_bytes());
        }
    }
}

/// Take the lock if free (bumping the fencing counter), re-grant it to the
/// same owner, or report the holder's remaining TTL.
///
/// `ARGV[1]` owner, `ARGV[2]` TTL in ms, `ARGV[3]` the queue mode: empty
/// (a single attempt, or a Redlock node: never queue), `join` (a waiter's
/// first attempt: queue up when busy) or `queued` (a waiter already in
/// line: renew its place when busy, leave the line when taking the lock);
/// with a mode, `ARGV[4]` is how long the place lasts unrenewed (ms),
/// `ARGV[5]` the channel that tells the waiter's client of a hand-over,
/// `ARGV[6]` the number of this attempt among the waiter's attempts,
/// `KEYS[3]` the line (a list of owners in arrival order) and `KEYS[4]`
/// the places (owner -> `deadline:ttl:attempt:channel`, deadline in server
/// ms).
///
/// Returns one integer, because this is the hot path and a table costs the
/// server and the client more: `n >= 1` acquired with token `n`; `0` busy,
/// the holder's key has no TTL; `n <= -1` busy for another `-n - 1` ms.
/// Returns the string `foreign` when the lock key holds a string that is
/// not an owner token, `counter` when the fencing counter is not an
/// integer (nothing taken), `semaphore:N` when the key holds a semaphore's
/// permits (limit N), `election` when it holds an election's leader,
/// `wrongtype` for a key of another type. A read lock's
/// readers (a hash marked `readers`) make the key busy until the last of
/// them ends. These cost nothing on the way to a grant: they are read only
/// once `SET NX` failed.
pub(crate) static ACQUIRE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        r"
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  local token = redis.pcall('INCR', KEYS[2])
  if type(token) == 'table' then
    redis.call('DEL', KEYS[1])
    return 'counter'
  end
  if ARGV[3] == 'queued' then
    -- The lock is taken: a line key of another type (not ours to touch)
    -- must not turn that into an error that leaves the lock behind.
    redis.pcall('HDEL', KEYS[4], ARGV[1])
    redis.pcall('LREM', KEYS[3], 1, ARGV[1])
  end
  return token
end
local holder = redis.pcall('GET', KEYS[1])
if type(holder) == 'table' then
  -- Not a string: a semaphore's permits (a hash with its limit), a read
  -- lock's readers (its hash's TTL is the last reader's end), or not ours.
  local limit = redis.pcall('HGET', KEYS[1], 'limit')
  if type(limit) == 'string' then return 'semaphore:' .. limit end
  if redis.pcall('HEXISTS', KEYS[1], 'leader') == 1 then return 'election' end
  if redis.pcall('HEXISTS', KEYS[1], 'readers') ~= 1 then return 'wrongtype' end
else
  if holder == ARGV[1] then
    -- A retried request, or a release handed the lock to this waiter.
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    return tonumber(redis.call('GET', KEYS[2]) or '') or 'counter'
  end
  if string.len(holder) ~= 32 or string.find(holder, '[^0-9a-f]') then
    return 'foreign'
  end
end
if ARGV[3] ~= '' then
  local now = redis.call('TIME')
  local deadline = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) + tonumber(ARGV[4])
  {take_place}
end
return -1 - redis.call('PTTL', KEYS[1])
",
        take_place = take_place_lua(WRITER_PLACE)
    ))
});

/// What a writer's (or a mutex's, or a permit's) place in line starts with:
/// nothing, as before read locks existed.
const WRITER_PLACE: &str = "";
/// What a reader's place in line starts with: `R`, so that a hand-over
/// tells readers from writers (and an older client's hand-over, which
/// reads places as `deadline:ttl:attempt:channel`, passes readers over
/// rather than giving them a writer's lock).
const READER_PLACE: &str = "R";

/// Lua statements that take `ARGV[1]`'s place in the line (at its end) or
/// renew it, until `deadline` (server ms), marked as a reader's or a
/// writer's (`mark`); spliced into the acquire scripts where a waiter
/// found the key busy.
fn take_place_lua(mark: &str) -> String {
    format!(
        r"
  if redis.call('HSET', KEYS[4], ARGV[1], string.format('{mark}%d:%s:%s:%s', deadline, ARGV[2], ARGV[6], ARGV[5])) == 1 then
    redis.call('RPUSH', KEYS[3], ARGV[1])
  end
  redis.call('PEXPIRE', KEYS[3], 2 * tonumber(ARGV[4]))
  redis.call('PEXPIRE', KEYS[4], 2 * tonumber(ARGV[4]))
"
    )
}

/// The first word of a hand-over message: `HAND_OVER_V2 owner token
/// attempt px`. Clients before it read `owner token attempt` and counted
/// the reservation from their own settings; this word makes them drop the
/// message (its second word is no fencing token) and find the lock with a
/// round trip instead, which sets their own TTL.
pub(crate) const HAND_OVER_V2: &str = "v2";

/// The hand-over message: `v2 owner token attempt px`, the attempt being
/// the last one the server saw from the waiter before the hand-over and
/// `px` its reservation in ms, the lease the waiter counts from (whatever
/// its own settings say). A Lua expression over `waiter`, `token`,
/// `attempt` and `px`.
const HAND_OVER_MESSAGE_LUA: &str = "'v2 ' .. waiter .. ' ' .. token .. ' ' .. attempt .. ' ' .. px";

/// A hand-over function `name` for a semaphore's line, whose waiters all
/// ask for the same: `name()` gives the first waiter in line whose place is
/// still renewed a reservation of `min(its TTL, ARGV[2] ms)` with a new
/// fencing token, with the Lua statement `grant` (it may use `waiter`,
/// `token`, `px` and `now`), and tells it on its client's channel (see
/// [`HAND_OVER_MESSAGE_LUA`]). Waiters whose places ran out are dropped on
/// the way. Returns the message, or false when nobody waits.
fn hand_over_lua_granting(name: &str, grant: &str) -> String {
    format!(
        r"
local function {name}()
  local now
  while true do
    local waiter = redis.pcall('LPOP', KEYS[3])
    if type(waiter) ~= 'string' then return false end
    local place = redis.pcall('HGET', KEYS[4], waiter)
    if type(place) == 'string' then
      redis.pcall('HDEL', KEYS[4], waiter)
      if not now then
        local time = redis.call('TIME')
        now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
      end
      local deadline, ttl, attempt, channel = string.match(place, '^(%d+):(%d+):(%d+):(.+)$')
      if deadline and tonumber(deadline) >= now then
        local token = redis.pcall('INCR', KEYS[2])
        -- A broken counter: free the lock; each waiter's next attempt reports it.
        if type(token) == 'table' then return false end
        local px = math.min(tonumber(ttl), tonumber(ARGV[2]))
        {grant}
        local message = {HAND_OVER_MESSAGE_LUA}
        redis.call('PUBLISH', channel, message)
        return message
      end
    end
  end
end
"
    )
}

/// Lua for a mutex's (a writer's) release with a line of waiters (single
/// server, Sentinel, Cluster): `release_lock()`: if `ARGV[1]` owns the
/// lock, hand the key to the waiters at the head of the line (see
/// `admit_waiters`) or delete it; if not, remove `ARGV[1]`'s place in line
/// (a waiter giving up). Returns the hand-over messages when waiters got
/// the key, 1 released with nobody waiting, 0 no lock, -1 another owner
/// (or readers). Needs `admit_waiters` before it.
const RELEASE_LOCK_LUA: &str = r"
local function release_lock()
  local holder = redis.pcall('GET', KEYS[1])
  if holder == ARGV[1] then
    redis.call('DEL', KEYS[1])
    local sent = admit_waiters(0)
    if #sent > 0 then return sent end
    return 1
  end
  if redis.pcall('HDEL', KEYS[4], ARGV[1]) == 1 then
    redis.pcall('LREM', KEYS[3], 1, ARGV[1])
  end
  if holder == false then
    -- The lock may have run out while waiters slept; hand it on now.
    admit_waiters(0)
    return 0
  end
  return -1
end
";

/// Release with a line of waiters (single server, Sentinel, Cluster); see
/// `release_lock` above. Keys as in [`ACQUIRE`]; `ARGV[2]` the longest
/// reservation.
pub(crate) static RELEASE_TO_NEXT: LazyLock<Script> = LazyLock::new(|| {
    let admit = admit_waiters_lua();
    Script::new(&format!("{admit}{RELEASE_LOCK_LUA}\nreturn release_lock()\n"))
});

/// Reset the TTL if we own the lock. `ARGV[1]` owner, `ARGV[2]` TTL in ms.
/// Returns 1 extended, 0 no lock, -1 another owner.
pub(crate) static EXTEND: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if holder == false then return 0 end
return -1
",
    )
});

/// Redlock nodes (whose waiters do not queue): delete the lock if we own it
/// and publish an empty message on its release channel, which wakes every
/// waiter. `ARGV[1]` owner, `ARGV[2]` channel. Returns 1 released, 0 no
/// lock, -1 another owner.
#[cfg(feature = "redlock")]
pub(crate) static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  redis.call('DEL', KEYS[1])
  redis.call('PUBLISH', ARGV[2], '')
  return 1
end
if holder == false then return 0 end
return -1
",
    )
});

/// Redlock: raise the fencing counter to at least `ARGV[1]`, so that a
/// quorum of nodes agrees on the highest token handed out. Returns 1, or 0
/// when the counter is not an integer (left alone).
#[cfg(feature = "redlock")]
pub(crate) static RAISE_FENCE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local current = redis.call('GET', KEYS[1])
if current and not tonumber(current) then return 0 end
if tonumber(current or '0') < tonumber(ARGV[1]) then
  redis.call('SET', KEYS[1], ARGV[1])
end
return 1
",
    )
});

/// For operators: the lock's remaining TTL in ms (-2 free, -1 no TTL) and
/// the fencing counter (-1 when absent). Reads only.
/// A semaphore also answers its live permits and its limit, a read lock
/// its live readers and the limit 0, an election 1 and -2 (-1 for a
/// mutex); leases that ran out are removed on the way.
pub(crate) static STATUS: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        r"{PERMITS_LUA}
local counter = redis.call('GET', KEYS[2])
local holders, limit = -1, -1
if redis.call('TYPE', KEYS[1])['ok'] == 'hash' then
  local held, permits, _, _, _, shared = live_permits(server_now())
  if held == 'election' then
    holders, limit = 1, -2
  elseif held ~= 'foreign' then
    holders, limit = held, permits or -1
    if shared then limit = 0 end
  end
end
return {{redis.call('PTTL', KEYS[1]), tonumber(counter or '-1') or -1, holders, limit}}
"
    ))
});

/// For operators: delete the lock whoever holds it, hand the key to the
/// waiters at the head of the line if there are any (see
/// `admit_waiters`), else announce the release with an empty message on
/// the key's channel `ARGV[1]` (for Redlock waiters). Keys as in
/// [`ACQUIRE`]; `ARGV[2]` the longest reservation. Returns 1 if there was
/// a lock. A read lock's readers all end; a semaphore's permits all end,
/// and as many waiters as its limit get one; an election's leader ends.
pub(crate) static FORCE_RELEASE: LazyLock<Script> = LazyLock::new(|| {
    let (admit, permit) = (admit_waiters_lua(), hand_over_permit_lua());
    Script::new(&format!(
        r"{PERMITS_LUA}{admit}{permit}
local held = 0
if redis.call('TYPE', KEYS[1])['ok'] == 'hash' then
  local live, limit, _, _, _, shared = live_permits(server_now())
  if live == 'foreign' then return 0 end
  if live == 'election' then
    -- Nobody stands in line for an election: the candidates and
    -- observers listen on the release channel.
    redis.call('DEL', KEYS[1])
    redis.call('PUBLISH', ARGV[1], 'resigned')
    return 1
  end
  redis.call('DEL', KEYS[1])
  if not shared then
    local handed = 0
    while handed < limit and hand_over_permit() do handed = handed + 1 end
    if handed > 0 then redis.call('HSET', KEYS[1], 'limit', limit) end
    if live > 0 then return 1 end
    return 0
  end
  if live > 0 then held = 1 end
else
  held = redis.call('DEL', KEYS[1])
end
if #admit_waiters(0) == 0 then
  redis.call('PUBLISH', ARGV[1], '')
end
return held
"
    ))
});

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_names_its_keys_as_key_name_does() {
        let call = ScriptCall::new(&EXTEND, "dlock:", "orders/7", &[LOCK, FENCE, LINE, PLACES]).arg("owner");
        let mut expected = redis::cmd("EVALSHA");
        expected.arg(EXTEND.get_hash()).arg(4);
        for suffix in [LOCK, FENCE, LINE, PLACES] {
            expected.arg(key_name("dlock:", "orders/7", suffix));
        }
        expected.arg("owner");
        assert_eq!(call.command.get_packed_command(), expected.get_packed_command());
        assert_eq!(key_name("dlock:", "orders/7", FENCE), "dlock:{orders/7}:fence");
    }

    /// The text between a name's first `{` and the next `}`, as Redis
    /// Cluster hashes it (`None`: the whole name is hashed).
    fn hash_tag(name: &str) -> Option<&str> {
        let open = name.find('{')?;
        let close = name[open + 1..].find('}')? + open + 1;
        (close > open + 1).then(|| &name[open + 1..close])
    }

    #[test]
    fn hand_over_messages_start_with_the_version_word() {
        assert!(HAND_OVER_MESSAGE_LUA.starts_with(&format!("'{HAND_OVER_V2} '")));
        let scripts = [
            &*RELEASE_TO_NEXT,
            &*RELEASE_PERMIT,
            &*RELEASE_SHARED,
            &*ABANDON,
            &*FORCE_RELEASE,
        ];
        for script in scripts {
            let code = format!("{script:?}");
            assert!(code.contains(HAND_OVER_MESSAGE_LUA), "{code}");
        }
    }

    #[test]
    fn every_key_puts_its_names_in_one_slot() {
        for key in [
            "orders/7", "}", "}leading", "{}", "a{}b", "{x}", "}{", "{", "a}b{c", "}}",
        ] {
            let names: Vec<String> = [LOCK, FENCE, LINE, PLACES, RELEASED]
                .iter()
                .map(|suffix| key_name("dlock:", key, suffix))
                .collect();
            let tag = hash_tag(&names[0]);
            assert!(tag.is_some(), "{key:?}: {} has an empty hash tag", names[0]);
            for name in &names {
                assert_eq!(hash_tag(name), tag, "{key:?}: {name} is in another slot");
            }
        }
        // Escaped names stay apart from every other key's.
        assert_ne!(key_name("dlock:", "}a", LOCK), key_name("dlock:", "a", LOCK));
    }
}
