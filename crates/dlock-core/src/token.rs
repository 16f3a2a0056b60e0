//! Fencing tokens (public, ordered) and owner tokens (secret, random).

use std::fmt;

use crate::error::LockError;

/// A number that strictly increases with every acquisition of a key.
///
/// Hand it to the resource you protect with every write, and have the
/// resource refuse writes whose token is lower than the highest it has seen:
/// a holder that lost its lock without noticing (a long pause, a partition)
/// is then stopped by the resource itself.
///
/// ```
/// use dlock_core::FencingToken;
///
/// let first = FencingToken::new(7);
/// let second = FencingToken::new(8);
/// assert!(first < second);
/// assert_eq!(second.get(), 8);
/// assert_eq!(second.to_string(), "8");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FencingToken(u64);

impl FencingToken {
    /// Wraps a raw token value, as read from a backend.
    pub const fn new(value: u64) -> Self {
        FencingToken(value)
    }

    /// The raw value, for storing next to the data it protects.
    pub const fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for FencingToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl From<FencingToken> for u64 {
    fn from(token: FencingToken) -> u64 {
        token.0
    }
}

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
pub struct OwnerToken(String);

impl OwnerToken {
    /// Number of random bytes in a token.
    pub const RANDOM_BYTES: usize = 16;

    /// Draws a fresh token from the OS random generator.
    pub fn generate() -> Result<Self, LockError> {
        let mut bytes = [0u8; Self::RANDOM_BYTES];
        getrandom::fill(&mut bytes).map_err(|error| {
            LockError::unavailable(
                None,
                format!("the operating system's random generator failed: {error}"),
            )
        })?;
        let mut hex = String::with_capacity(Self::RANDOM_BYTES * 2);
        for byte in bytes {
            hex.push(char::from(HEX_DIGITS[usize::from(byte >> 4)]));
            hex.push(char::from(HEX_DIGITS[usize::from(byte & 0x0f)]));
        }
        Ok(OwnerToken(hex))
    }

    /// The token as stored in the backend.
    pub fn as_str(&self) -> &str {
        &self.0
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
