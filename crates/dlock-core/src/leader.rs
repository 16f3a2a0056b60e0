//! `Leader`: who leads an election, as the backend trait and the user API
//! both name it (below the backend module, so that imports go one way).

use crate::token::FencingToken;

/// Who leads an election: the value the leader campaigned with or last
/// proclaimed, and its term.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Leader {
    /// The leader's public value (an address, a name).
    pub value: String,
    /// The leader's term: the fencing token of its lease, greater than
    /// every term before it in this election.
    pub term: FencingToken,
}
