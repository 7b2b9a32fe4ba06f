//! (c) A fenced resource for tests: a register that accepts an access only
//! with a token at least as large as any it has seen.
//!
//! Clients increment it by a slow read-modify-write under an exclusive
//! lock, passing their fencing token to both the read and the write. The
//! read counts as "seen": once a newer holder has read, an older holder's
//! write is refused, so the read-modify-write of a holder whose lock was
//! taken over cannot overwrite the newer holder's (fencing the write alone
//! would still let the stale write land between the newer holder's read and
//! write). With correct tokens no acknowledged increment is ever lost; two
//! grants with one token, or a token reissued, lose one — which
//! [`check_increments`] catches.

use std::sync::{Mutex, MutexGuard};

use oclocks_core::Token;

use crate::report::Violation;

/// The register's contents and counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RegisterState {
    pub value: u64,
    /// The largest token any accepted access carried.
    pub max_token: Token,
    pub writes_accepted: u64,
    pub refused: u64,
}

/// An access with a token older than one the register has seen.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("fenced: token {token} is older than token {max_token} the register has seen")]
pub struct Fenced {
    pub token: Token,
    pub max_token: Token,
}

/// A register guarded by fencing tokens. Shareable (`&self` methods).
#[derive(Debug, Default)]
pub struct FencedRegister {
    st: Mutex<RegisterState>,
}

impl FencedRegister {
    pub fn new() -> FencedRegister {
        FencedRegister::default()
    }

    fn lock(&self) -> MutexGuard<'_, RegisterState> {
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn admit(st: &mut RegisterState, token: Token) -> Result<(), Fenced> {
        if token < st.max_token {
            st.refused += 1;
            return Err(Fenced {
                token,
                max_token: st.max_token,
            });
        }
        st.max_token = token;
        Ok(())
    }

    /// Read the value, fenced by `token` (which the register then has seen).
    pub fn read(&self, token: Token) -> Result<u64, Fenced> {
        let mut st = self.lock();
        Self::admit(&mut st, token)?;
        Ok(st.value)
    }

    /// Write `value`, fenced by `token`.
    pub fn write(&self, token: Token, value: u64) -> Result<(), Fenced> {
        let mut st = self.lock();
        Self::admit(&mut st, token)?;
        st.value = value;
        st.writes_accepted += 1;
        Ok(())
    }

    /// The current contents.
    pub fn state(&self) -> RegisterState {
        *self.lock()
    }
}

/// The register after `acknowledged` increments whose write was accepted and
/// `indeterminate` whose outcome is unknown (zero for an in-process
/// register) must hold a value in `acknowledged ..= acknowledged +
/// indeterminate` (starting from 0).
pub fn check_increments(
    state: &RegisterState,
    acknowledged: u64,
    indeterminate: u64,
) -> Result<(), Violation> {
    let v = state.value;
    if v < acknowledged || v > acknowledged.saturating_add(indeterminate) {
        return Err(Violation::LostUpdate {
            value: v,
            acknowledged,
            indeterminate,
        });
    }
    Ok(())
}
