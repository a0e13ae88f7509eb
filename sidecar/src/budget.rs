//! The retry budget: retries may add at most 20% to a function's requests, plus 10 per second
//! of slack, over a 10-second window (tower's `TpsBudget`), so that retries never multiply an
//! outage.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tower::retry::budget::{Budget, TpsBudget};

/// How long a request counts towards the budget.
pub const BUDGET_TTL: Duration = Duration::from_secs(10);
/// Retries per second allowed whatever the request rate (for quiet functions).
pub const MIN_RETRIES_PER_SEC: u32 = 10;
/// Retries allowed as a fraction of requests.
pub const RETRY_RATIO: f32 = 0.2;

/// One function's budget. Every request deposits; every retry withdraws.
#[derive(Debug)]
pub struct RetryBudget {
    inner: TpsBudget,
}

impl Default for RetryBudget {
    fn default() -> Self {
        Self::new(BUDGET_TTL, MIN_RETRIES_PER_SEC, RETRY_RATIO)
    }
}

impl RetryBudget {
    /// `ttl` must be within 1..=60 s and `ratio` within 0..=1000 (tower's limits); the
    /// constants above are.
    pub fn new(ttl: Duration, min_per_sec: u32, ratio: f32) -> Self {
        let ttl = ttl.clamp(Duration::from_secs(1), Duration::from_secs(60));
        let ratio = ratio.clamp(0.0, 1000.0);
        Self {
            inner: TpsBudget::new(ttl, min_per_sec.min(i32::MAX as u32 - 1), ratio),
        }
    }

    /// A request arrived.
    pub fn deposit(&self) {
        self.inner.deposit();
    }

    /// Whether one retry may be sent now (and, if so, takes it from the budget).
    pub fn withdraw(&self) -> bool {
        self.inner.withdraw()
    }
}

/// One budget per (namespace, name) while some table holds it, so table swaps keep it.
#[derive(Debug, Default)]
pub struct BudgetRegistry {
    budgets: Mutex<HashMap<(String, String), Weak<RetryBudget>>>,
}

impl BudgetRegistry {
    pub fn get(&self, namespace: &str, name: &str) -> Arc<RetryBudget> {
        let mut budgets = self
            .budgets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let key = (namespace.to_owned(), name.to_owned());
        if let Some(existing) = budgets.get(&key).and_then(Weak::upgrade) {
            return existing;
        }
        let budget = Arc::new(RetryBudget::default());
        budgets.insert(key, Arc::downgrade(&budget));
        budget
    }

    pub fn prune(&self) {
        self.budgets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .retain(|_, weak| weak.strong_count() > 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn reserve_then_twenty_percent() {
        let budget = RetryBudget::default();
        // The reserve: 10 per second over 10 s.
        let mut allowed = 0;
        while budget.withdraw() {
            allowed += 1;
        }
        assert_eq!(allowed, 100);
        // Then one retry per 5 requests.
        for _ in 0..50 {
            budget.deposit();
        }
        let mut allowed = 0;
        while budget.withdraw() {
            allowed += 1;
        }
        assert_eq!(allowed, 10);
    }

    #[tokio::test(start_paused = true)]
    async fn spent_budget_recovers_after_the_window() {
        let budget = RetryBudget::default();
        while budget.withdraw() {}
        assert!(!budget.withdraw());
        tokio::time::advance(BUDGET_TTL + Duration::from_secs(1)).await;
        assert!(budget.withdraw());
    }

    #[test]
    fn registry_shares_per_function() {
        let registry = BudgetRegistry::default();
        let a = registry.get("default", "f");
        let b = registry.get("default", "f");
        let c = registry.get("default", "g");
        assert!(Arc::ptr_eq(&a, &b));
        assert!(!Arc::ptr_eq(&a, &c));
    }
}
