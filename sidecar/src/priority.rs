//! Envoy-style priority levels: each tier gets traffic up to its health (healthy share of its
//! endpoints times an overprovisioning factor of 1.4); what it cannot take spills to the next
//! tier. Loads are in permille.

use std::time::Duration;

use crate::routes::{Order, Tier};

/// Tiers considered per function; a longer failover list is cut here.
pub const MAX_TIERS: usize = 16;
/// Overprovisioning factor (permille): a tier with 5 of 7 endpoints healthy still takes all.
pub const OVERPROVISIONING: usize = 1400;
pub const FULL: u32 = 1000;

/// A tier's health in permille: `healthy / total * 1.4`, at most 1000; 0 without healthy
/// endpoints.
pub fn tier_health(healthy: usize, total: usize) -> u32 {
    if healthy == 0 || total == 0 {
        return 0;
    }
    let permille = healthy.saturating_mul(OVERPROVISIONING) / total;
    u32::try_from(permille.min(FULL as usize)).unwrap_or(FULL)
}

/// Fills `loads` (same length as `health`, in priority order) with each tier's share of traffic
/// in permille. Tier 0 takes up to its health, the next tier up to its health from what is
/// left, and so on. If the healths add up to less than 100% the loads are normalised so they
/// still sum to 1000; all zero when no tier is healthy.
pub fn priority_load(health: &[u32], loads: &mut [u32]) {
    let total: u32 = health.iter().map(|h| (*h).min(FULL)).sum();
    for load in loads.iter_mut() {
        *load = 0;
    }
    if total == 0 {
        return;
    }
    if total >= FULL {
        let mut remaining = FULL;
        for (load, h) in loads.iter_mut().zip(health) {
            let take = (*h).min(FULL).min(remaining);
            *load = take;
            remaining -= take;
        }
        return;
    }
    let mut assigned = 0;
    for (load, h) in loads.iter_mut().zip(health) {
        *load = (*h).min(FULL) * FULL / total;
        assigned += *load;
    }
    // Rounding leftovers go to the first tier that has any load.
    if let Some(first) = loads.iter_mut().find(|l| **l > 0) {
        *first += FULL.saturating_sub(assigned);
    }
}

/// The tier (index into `loads`) a roll in `0..sum(loads)` falls on.
pub fn pick(loads: &[u32], roll: u32) -> Option<usize> {
    let mut acc = 0;
    for (i, load) in loads.iter().enumerate() {
        acc += load;
        if roll < acc {
            return Some(i);
        }
    }
    None
}

/// The probe RTT a measured tier sorts by: the best of its gateways that answered; unknown
/// (never probed, or no probe succeeded) sorts last.
fn tier_rtt(tier: &Tier) -> Duration {
    tier.endpoints
        .iter()
        .filter_map(|e| e.shared.rtt())
        .min()
        .unwrap_or(Duration::MAX)
}

/// The order tiers are tried in: LOCAL first, EXPLICIT as the spec lists them, MEASURED by
/// probe RTT (unknown last). Writes tier indices into `order`; returns how many.
pub fn order(tiers: &[Tier], order: &mut [usize; MAX_TIERS]) -> usize {
    let n = tiers.len().min(MAX_TIERS);
    let mut len = 0;
    for wanted in [Order::Local, Order::Explicit] {
        for (i, tier) in tiers.iter().enumerate().take(n) {
            if tier.order == wanted {
                order[len] = i;
                len += 1;
            }
        }
    }
    let measured_start = len;
    for (i, tier) in tiers.iter().enumerate().take(n) {
        if tier.order == Order::Measured {
            order[len] = i;
            len += 1;
        }
    }
    if len - measured_start > 1 {
        // A handful of tiers at most: sorting on the stack is cheaper than caching.
        order[measured_start..len].sort_by_key(|&i| tier_rtt(&tiers[i]));
    }
    len
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loads(health: &[u32]) -> Vec<u32> {
        let mut out = vec![0; health.len()];
        priority_load(health, &mut out);
        out
    }

    #[test]
    fn health_is_overprovisioned_and_capped() {
        assert_eq!(tier_health(4, 4), 1000);
        assert_eq!(tier_health(3, 4), 1000);
        assert_eq!(tier_health(2, 4), 700);
        assert_eq!(tier_health(1, 4), 350);
        assert_eq!(tier_health(0, 4), 0);
        assert_eq!(tier_health(0, 0), 0);
    }

    #[test]
    fn healthy_local_tier_takes_everything() {
        assert_eq!(loads(&[1000, 1000, 1000]), vec![1000, 0, 0]);
    }

    #[test]
    fn half_the_local_tier_keeps_seventy_percent() {
        // tier0: 2 of 4 healthy -> 70% local, 30% to the next tier.
        assert_eq!(loads(&[tier_health(2, 4), 1000]), vec![700, 300]);
    }

    #[test]
    fn spill_cascades_through_tiers() {
        assert_eq!(loads(&[350, 500, 1000]), vec![350, 500, 150]);
        assert_eq!(loads(&[0, 1000, 1000]), vec![0, 1000, 0]);
    }

    #[test]
    fn unhealthy_total_is_normalised() {
        // 35% + 35% = 70% < 100%: each gets half.
        assert_eq!(loads(&[350, 350]), vec![500, 500]);
        let l = loads(&[300, 0, 100]);
        assert_eq!(l.iter().sum::<u32>(), 1000);
        assert_eq!(l, vec![750, 0, 250]);
    }

    #[test]
    fn nothing_healthy_gives_no_load() {
        assert_eq!(loads(&[0, 0]), vec![0, 0]);
    }

    #[test]
    fn pick_follows_cumulative_loads() {
        let l = [700, 300];
        assert_eq!(pick(&l, 0), Some(0));
        assert_eq!(pick(&l, 699), Some(0));
        assert_eq!(pick(&l, 700), Some(1));
        assert_eq!(pick(&l, 999), Some(1));
        assert_eq!(pick(&l, 1000), None);
    }
}
