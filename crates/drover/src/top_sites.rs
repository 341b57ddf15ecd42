//! Which sites get their own `site` label in the metrics: a bounded top-N by delivery volume
//! (sans-IO: the caller passes the time).
//!
//! With millions of destinations a label per site would make the metrics unbounded, so only
//! the busiest `limit` sites are named and everything else is `other`. Volumes are counted
//! with the Space-Saving algorithm in a table of at most [`CANDIDATES_PER_LABEL`] × `limit`
//! candidates (memory bounded however many sites there are), and decay by half every
//! [`HALF_LIFE_MS`], a sliding window that forgets last week's big sender. A site that is
//! named keeps its label until a challenger's volume passes its own by [`HYSTERESIS`], so
//! labels do not flap between two sites of about the same volume (each flap would start a
//! new series and end another).

use std::collections::{HashMap, HashSet};

/// The label of every site outside the top-N.
pub(crate) const OTHER: &str = "other";
/// Candidates tracked per label: enough that a rising site is seen before it is in the top.
pub(crate) const CANDIDATES_PER_LABEL: usize = 4;
/// Volumes halve every this many milliseconds (the sliding window).
pub(crate) const HALF_LIFE_MS: u64 = 10 * 60 * 1000;
/// A challenger replaces a named site only once its volume exceeds the named site's by this
/// factor.
pub(crate) const HYSTERESIS: f64 = 1.25;

/// The top-N tracker.
#[derive(Debug)]
pub(crate) struct TopSites {
    limit: usize,
    capacity: usize,
    /// Decayed volume per candidate site (Space-Saving: may overestimate a newcomer by the
    /// volume of the candidate it displaced, never underestimates a candidate).
    volume: HashMap<String, f64>,
    named: HashSet<String>,
    decayed_at_ms: u64,
}

impl TopSites {
    /// A tracker naming at most `limit` sites (0: every site is `other`).
    pub(crate) fn new(limit: usize, now_ms: u64) -> TopSites {
        TopSites {
            limit,
            capacity: limit.saturating_mul(CANDIDATES_PER_LABEL).max(16),
            volume: HashMap::new(),
            named: HashSet::new(),
            decayed_at_ms: now_ms,
        }
    }

    /// Counts `n` messages for `site`.
    pub(crate) fn record(&mut self, site: &str, n: u64) {
        if self.limit == 0 {
            return;
        }
        // While there is room, a site is named at once: a small installation sees every
        // site by name from its first message.
        if self.named.len() < self.limit && !self.named.contains(site) {
            self.named.insert(site.to_owned());
        }
        let n = n as f64;
        if let Some(v) = self.volume.get_mut(site) {
            *v += n;
            return;
        }
        if self.volume.len() < self.capacity {
            self.volume.insert(site.to_owned(), n);
            return;
        }
        // The table is full: the smallest unnamed candidate makes room, and the newcomer
        // inherits its count (Space-Saving), so a site that keeps coming back climbs.
        let weakest = self
            .volume
            .iter()
            .filter(|(s, _)| !self.named.contains(s.as_str()))
            .min_by(|a, b| a.1.total_cmp(b.1))
            .map(|(s, v)| (s.clone(), *v));
        if let Some((gone, floor)) = weakest {
            self.volume.remove(&gone);
            self.volume.insert(site.to_owned(), floor + n);
        }
    }

    /// The label for `site`: its name when it is in the top, else [`OTHER`].
    pub(crate) fn label<'a>(&self, site: &'a str) -> &'a str {
        if self.named.contains(site) {
            site
        } else {
            OTHER
        }
    }

    /// Whether `site` has its own label.
    #[cfg(test)]
    pub(crate) fn is_named(&self, site: &str) -> bool {
        self.named.contains(site)
    }

    /// The sites with their own label.
    #[cfg(test)]
    pub(crate) fn named(&self) -> impl Iterator<Item = &str> {
        self.named.iter().map(String::as_str)
    }

    /// Applies the decay due by `now_ms` and re-decides the named sites. Returns the sites
    /// that lost their label (their series end).
    pub(crate) fn refresh(&mut self, now_ms: u64) -> Vec<String> {
        let halvings = now_ms.saturating_sub(self.decayed_at_ms) / HALF_LIFE_MS;
        if halvings > 0 {
            let factor = 0.5f64.powi(halvings.min(64) as i32);
            self.volume.values_mut().for_each(|v| *v *= factor);
            // Less than a message left: forgotten, so the table makes room for live sites.
            self.volume.retain(|_, v| *v >= 0.5);
            self.decayed_at_ms += halvings * HALF_LIFE_MS;
        }
        let mut ranked: Vec<(&String, f64)> = self.volume.iter().map(|(s, v)| (s, *v)).collect();
        ranked.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(b.0)));
        ranked.truncate(self.limit);
        let volume_of = |s: &str| self.volume.get(s).copied().unwrap_or(0.0);
        let mut dropped = Vec::new();
        let mut named = std::mem::take(&mut self.named);
        // A named site nothing was sent to for a whole decay is no longer a candidate.
        named.retain(|s| {
            let keep = self.volume.contains_key(s);
            if !keep {
                dropped.push(s.clone());
            }
            keep
        });
        for (site, volume) in &ranked {
            if named.contains(site.as_str()) {
                continue;
            }
            if named.len() < self.limit {
                named.insert((*site).clone());
                continue;
            }
            let weakest = named
                .iter()
                .map(|s| (s.clone(), volume_of(s)))
                .min_by(|a, b| a.1.total_cmp(&b.1));
            match weakest {
                Some((gone, floor)) if *volume > floor * HYSTERESIS => {
                    named.remove(&gone);
                    dropped.push(gone);
                    named.insert((*site).clone());
                }
                // The ranking is by volume: no later challenger beats this one's margin.
                _ => break,
            }
        }
        self.named = named;
        dropped.retain(|s| !self.named.contains(s));
        dropped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_busiest_sites_are_named_and_the_rest_are_other() {
        let mut top = TopSites::new(2, 0);
        top.record("big.example", 100);
        top.record("mid.example", 50);
        top.record("small.example", 5);
        assert_eq!(top.refresh(1), Vec::<String>::new());
        assert_eq!(top.label("big.example"), "big.example");
        assert_eq!(top.label("mid.example"), "mid.example");
        assert_eq!(top.label("small.example"), OTHER);
        assert_eq!(top.named().count(), 2);
    }

    #[test]
    fn a_close_challenger_does_not_flap_the_labels() {
        let mut top = TopSites::new(1, 0);
        top.record("a.example", 100);
        top.refresh(1);
        assert!(top.is_named("a.example"));
        // 10 % ahead: not enough to take the label.
        top.record("b.example", 110);
        assert!(top.refresh(2).is_empty());
        assert!(top.is_named("a.example") && !top.is_named("b.example"));
        // Well ahead: it takes over, and the old one is reported as dropped.
        top.record("b.example", 100);
        assert_eq!(top.refresh(3), vec!["a.example".to_owned()]);
        assert!(top.is_named("b.example") && !top.is_named("a.example"));
    }

    #[test]
    fn volume_decays_so_a_past_burst_gives_way_to_current_traffic() {
        let mut top = TopSites::new(1, 0);
        top.record("old.example", 1000);
        top.refresh(0);
        assert!(top.is_named("old.example"));
        // An hour later (six half-lives) the burst weighs about 16.
        let later = 6 * HALF_LIFE_MS;
        assert!(top.refresh(later).is_empty());
        top.record("new.example", 40);
        assert_eq!(top.refresh(later), vec!["old.example".to_owned()]);
        assert!(top.is_named("new.example"));
        // After long enough it is forgotten altogether.
        top.refresh(later + 20 * HALF_LIFE_MS);
        assert_eq!(top.named().count(), 0);
    }

    #[test]
    fn memory_stays_bounded_with_a_million_sites() {
        let mut top = TopSites::new(3, 0);
        for _ in 0..50 {
            top.record("steady.example", 1);
        }
        for i in 0..1_000_000u32 {
            if i % 4 == 0 {
                top.record("steady.example", 1);
            }
            top.record(&format!("d{i}.example"), 1);
        }
        assert!(top.volume.len() <= top.capacity);
        top.refresh(1);
        assert!(top.is_named("steady.example"));
        assert!(top.named().count() <= 3);
    }

    #[test]
    fn a_limit_of_zero_names_nothing() {
        let mut top = TopSites::new(0, 0);
        top.record("a.example", 10);
        top.refresh(1);
        assert_eq!(top.label("a.example"), OTHER);
    }
}
