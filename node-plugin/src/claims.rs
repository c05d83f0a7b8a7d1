//! Per-object claims: at most one operation at a time on a volume or snapshot. The engine
//! claims the objects an operation touches (a clone: the source and the new volume); the CSI
//! Node service claims a volume for the length of one stage, publish or unstage. A second
//! claimant of any key is refused at once — CSI's answer is ABORTED, and the CO retries.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

/// The keys held now; cheap to clone (shared).
#[derive(Debug, Clone, Default)]
pub struct Claims {
    held: Arc<Mutex<HashSet<String>>>,
}

/// Holds its keys until dropped.
#[derive(Debug)]
#[must_use = "the keys are released when the claim is dropped"]
pub struct Claim {
    held: Arc<Mutex<HashSet<String>>>,
    keys: Vec<String>,
}

impl Claims {
    /// Takes every key of `keys`, or none: `Err` names the first key someone else holds.
    pub fn take(&self, keys: Vec<String>) -> Result<Claim, String> {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(taken) = keys.iter().find(|k| held.contains(*k)) {
            return Err(taken.clone());
        }
        held.extend(keys.iter().cloned());
        Ok(Claim { held: self.held.clone(), keys })
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        for key in &self.keys {
            held.remove(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_claim_is_all_or_nothing_and_ends_when_dropped() {
        let claims = Claims::default();
        let first = claims.take(vec!["a".into(), "b".into()]).expect("free");
        assert_eq!(claims.take(vec!["c".into(), "b".into()]).err().as_deref(), Some("b"));
        let c = claims.take(vec!["c".into()]).expect("c was not taken by the refused claim");
        drop(first);
        let again = claims.take(vec!["a".into(), "b".into()]).expect("released");
        drop((again, c));
        assert!(claims.clone().take(vec!["a".into(), "b".into(), "c".into()]).is_ok());
    }
}
