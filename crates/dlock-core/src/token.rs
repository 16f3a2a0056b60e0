//! Fencing tokens: public, ordered, one per acquisition.

use std::fmt;

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
