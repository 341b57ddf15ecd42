//! RFC 5321 §5.1 ordering of MX records; pure, so it is tested without DNS.

use rand::seq::SliceRandom;
use rand::Rng;

/// One MX record: preference and exchange host (lower-case, no trailing dot; "" is the root).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MxRecord {
    /// Lower is preferred.
    pub preference: u16,
    /// The mail exchanger's host name.
    pub exchange: String,
}

/// Orders MX records for delivery: ascending preference, equal preferences shuffled (RFC 5321
/// §5.1 asks senders to spread load among them). Returns `None` for a null MX (RFC 7505): a
/// single record whose exchange is the root. Null-MX records mixed with real ones are ignored,
/// as are duplicate hosts.
pub fn select_mx<R: Rng + ?Sized>(
    mut records: Vec<MxRecord>,
    rng: &mut R,
) -> Option<Vec<MxRecord>> {
    let is_null = |r: &MxRecord| r.exchange.is_empty() || r.exchange == ".";
    if !records.is_empty() && records.iter().all(is_null) {
        return None;
    }
    records.retain(|r| !is_null(r));
    records.shuffle(rng);
    // A stable sort keeps the shuffled order within each preference.
    records.sort_by_key(|r| r.preference);
    let mut seen = std::collections::HashSet::new();
    records.retain(|r| seen.insert(r.exchange.clone()));
    Some(records)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn mx(p: u16, h: &str) -> MxRecord {
        MxRecord {
            preference: p,
            exchange: h.into(),
        }
    }

    #[test]
    fn sorted_by_preference_and_equal_ones_shuffled() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut firsts = std::collections::HashSet::new();
        for _ in 0..200 {
            let out = select_mx(
                vec![mx(20, "c"), mx(10, "a"), mx(10, "b"), mx(30, "d")],
                &mut rng,
            )
            .unwrap();
            let prefs: Vec<u16> = out.iter().map(|r| r.preference).collect();
            assert_eq!(prefs, vec![10, 10, 20, 30]);
            firsts.insert(out[0].exchange.clone());
        }
        assert_eq!(
            firsts.len(),
            2,
            "both equal-preference hosts come first sometimes"
        );
    }

    #[test]
    fn null_mx() {
        let mut rng = rand::rng();
        assert_eq!(select_mx(vec![mx(0, "")], &mut rng), None);
        assert_eq!(
            select_mx(vec![mx(0, ""), mx(10, "a")], &mut rng),
            Some(vec![mx(10, "a")])
        );
        assert_eq!(select_mx(vec![], &mut rng), Some(vec![]));
        assert_eq!(
            select_mx(vec![mx(10, "a"), mx(20, "a")], &mut rng),
            Some(vec![mx(10, "a")])
        );
    }
}
