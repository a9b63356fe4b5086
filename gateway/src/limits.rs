//! Per-socket limits: the push budget and the control budget (token
//! buckets) and the count of unusable frames in a window. Time is passed in
//! as milliseconds of the gateway's clock (`Shared::clock_ms`: 8 bytes, where
//! an `Instant` takes 16 in every socket), so all are tested without waiting.

use std::time::Duration;

/// `rate` pushes per second on average, bursts of twice that.
pub(crate) struct PushBudget {
    rate: f32,
    tokens: f32,
    last_ms: u64,
}

impl PushBudget {
    pub(crate) fn new(rate_per_sec: u32, now_ms: u64) -> Self {
        // Rates are configured in whole pushes per second; f32 holds them
        // exactly up to 16 million.
        let rate = rate_per_sec as f32;
        Self {
            rate,
            tokens: rate * 2.0,
            last_ms: now_ms,
        }
    }

    /// Takes one push from the budget; `false` when it is spent.
    pub(crate) fn take(&mut self, now_ms: u64) -> bool {
        let refill = now_ms.saturating_sub(self.last_ms) as f32 / 1000.0 * self.rate;
        self.tokens = (self.tokens + refill).min(self.rate * 2.0);
        self.last_ms = now_ms.max(self.last_ms);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Default control frames (WebSocket pings and pongs, Phoenix heartbeats)
/// per second a socket may send on average, bursts of twice that
/// (`SOCKET_CONTROL_RATE_PER_SEC`). Clients heartbeat every
/// 30 s and ping at most every few seconds, so this is generous; it is there
/// so a ping flood costs a socket close, not a core.
pub(crate) const CONTROL_RATE_PER_SEC: u32 = 20;

/// The control budget: its own bucket, so pings never spend pushes and
/// pushes never starve heartbeats.
pub(crate) struct ControlBudget(PushBudget);

impl ControlBudget {
    pub(crate) fn new(rate_per_sec: u32, now_ms: u64) -> Self {
        Self(PushBudget::new(rate_per_sec, now_ms))
    }

    /// Takes one control frame from the budget; `false` when it is spent.
    pub(crate) fn take(&mut self, now_ms: u64) -> bool {
        self.0.take(now_ms)
    }
}

/// Unusable frames per [`STRIKE_WINDOW`]; more than `limit` ends the socket.
pub(crate) struct Strikes {
    limit: u32,
    count: u32,
    window_start_ms: u64,
}

/// The window strikes are counted in.
pub(crate) const STRIKE_WINDOW: Duration = Duration::from_secs(60);

impl Strikes {
    pub(crate) fn new(limit: u32, now_ms: u64) -> Self {
        Self {
            limit,
            count: 0,
            window_start_ms: now_ms,
        }
    }

    /// Counts one; `true` when this one is over the limit.
    pub(crate) fn strike(&mut self, now_ms: u64) -> bool {
        if u128::from(now_ms.saturating_sub(self.window_start_ms)) > STRIKE_WINDOW.as_millis() {
            self.window_start_ms = now_ms;
            self.count = 0;
        }
        self.count += 1;
        self.count > self.limit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_allows_a_burst_of_twice_the_rate_then_refills() {
        let t0 = 5_000u64;
        let mut budget = PushBudget::new(5, t0);
        assert_eq!((0..10).filter(|_| budget.take(t0)).count(), 10);
        assert!(!budget.take(t0), "the burst is spent");
        assert!(budget.take(t0 + 200), "one refilled");
        assert!(!budget.take(t0 + 200));
        let later = t0 + 60_000;
        assert_eq!(
            (0..100).filter(|_| budget.take(later)).count(),
            10,
            "refill stops at the burst"
        );
    }

    #[test]
    fn the_control_budget_is_its_own_generous_bucket() {
        let t0 = 5_000u64;
        let mut control = ControlBudget::new(CONTROL_RATE_PER_SEC, t0);
        let burst = 2 * CONTROL_RATE_PER_SEC as usize;
        assert_eq!((0..burst * 10).filter(|_| control.take(t0)).count(), burst);
        let one_second = t0 + 1_000;
        assert_eq!(
            (0..burst).filter(|_| control.take(one_second)).count(),
            CONTROL_RATE_PER_SEC as usize
        );
    }

    #[test]
    fn strikes_over_the_limit_in_a_window_end_the_socket_and_the_window_resets() {
        let t0 = 5_000u64;
        let mut strikes = Strikes::new(3, t0);
        assert!(!(0..3).any(|_| strikes.strike(t0)));
        assert!(strikes.strike(t0), "the fourth in the window is over");
        let next = t0 + STRIKE_WINDOW.as_millis() as u64 + 1_000;
        assert!(!strikes.strike(next), "a new window starts from zero");
    }
}
