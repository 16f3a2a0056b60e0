//! Owner tokens: secret, random, one per acquisition.

use std::fmt;

use crate::error::LockError;

/// The secret that marks one acquisition as the owner of a key.
///
/// 128 bits from the operating system's random generator, written as 32
/// lowercase hex digits. Only the holder of this value can extend or release
/// the lock; it is never printed (its `Debug` output is redacted).
///
/// ```
/// use dlock_core::OwnerToken;
///
/// let owner = OwnerToken::generate()?;
/// assert_eq!(owner.as_str().len(), 32);
/// assert!(!format!("{owner:?}").contains(owner.as_str()));
/// # Ok::<(), dlock_core::LockError>(())
/// ```
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct OwnerToken([u8; OwnerToken::RANDOM_BYTES * 2]);

impl OwnerToken {
    /// Number of random bytes in a token.
    pub const RANDOM_BYTES: usize = 16;

    /// Draws a fresh token from the OS random generator.
    ///
    /// The OS is asked for several tokens' worth of bytes at a time (one
    /// system call per [`POOL_TOKENS`] tokens, on each thread); each byte
    /// is handed out once and wiped from the pool.
    pub fn generate() -> Result<Self, LockError> {
        let bytes = RANDOM_POOL.with_borrow_mut(RandomPool::take)?;
        let mut hex = [0u8; Self::RANDOM_BYTES * 2];
        for (pair, byte) in hex.chunks_exact_mut(2).zip(bytes) {
            pair[0] = HEX_DIGITS[usize::from(byte >> 4)];
            pair[1] = HEX_DIGITS[usize::from(byte & 0x0f)];
        }
        Ok(OwnerToken(hex))
    }

    /// The token as stored in the backend.
    pub fn as_str(&self) -> &str {
        // Always lowercase hex digits, so always UTF-8.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

/// How many tokens' worth of OS randomness a thread fetches at once.
const POOL_TOKENS: usize = 16;

thread_local! {
    static RANDOM_POOL: std::cell::RefCell<RandomPool> = const {
        std::cell::RefCell::new(RandomPool { bytes: [0; POOL_TOKENS * OwnerToken::RANDOM_BYTES], used: POOL_TOKENS * OwnerToken::RANDOM_BYTES })
    };
}

/// Random bytes from the OS, not yet handed out. (A process that forks
/// without exec would share a pool with its child; Tokio programs do not
/// survive such a fork anyway.)
struct RandomPool {
    bytes: [u8; POOL_TOKENS * OwnerToken::RANDOM_BYTES],
    used: usize,
}

impl RandomPool {
    fn take(&mut self) -> Result<[u8; OwnerToken::RANDOM_BYTES], LockError> {
        if self.used == self.bytes.len() {
            getrandom::fill(&mut self.bytes).map_err(|error| {
                LockError::unavailable(
                    None,
                    format!("the operating system's random generator failed: {error}"),
                )
            })?;
            self.used = 0;
        }
        let mut taken = [0u8; OwnerToken::RANDOM_BYTES];
        let next = &mut self.bytes[self.used..self.used + OwnerToken::RANDOM_BYTES];
        taken.copy_from_slice(next);
        next.fill(0);
        self.used += OwnerToken::RANDOM_BYTES;
        Ok(taken)
    }
}

const HEX_DIGITS: &[u8; 16] = b"0123456789abcdef";

impl fmt::Debug for OwnerToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("OwnerToken(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn owner_tokens_are_128_random_bits_and_never_repeat() {
        let tokens: Vec<OwnerToken> = (0..10_000)
            .map(|_| OwnerToken::generate().expect("the OS random generator"))
            .collect();
        let distinct: HashSet<&str> = tokens.iter().map(OwnerToken::as_str).collect();
        assert_eq!(distinct.len(), tokens.len(), "a token repeated");
        for token in &tokens {
            assert_eq!(token.as_str().len(), 32);
            assert!(token.as_str().bytes().all(|digit| digit.is_ascii_hexdigit()));
        }
        // Every hex digit turns up in every position: no fixed bits.
        for position in 0..32 {
            let seen: HashSet<u8> = tokens
                .iter()
                .map(|token| token.as_str().as_bytes()[position])
                .collect();
            assert_eq!(seen.len(), 16, "position {position} is not uniformly random");
        }
    }
}
