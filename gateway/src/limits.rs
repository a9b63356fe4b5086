//! Per-socket limits: the push budget and the control budget (token
//! buckets) and the count of unusable frames in a window. Time is passed in,
//! so all are tested without waiting.

use std::time::Duration;

use tokio::time::Instant;

/// `rate` pushes per second on average, bursts of twice that.
pub(crate) struct PushBudget {
    rate: f64,
    tokens: f64,
    last: Instant,
}

impl PushBudget {
    pub(crate) fn new(rate_per_sec: u32, now: Instant) -> Self {
        let rate = f64::from(rate_per_sec);
        Self {
            rate,
            tokens: rate * 2.0,
            last: now,
        }
    }

    /// Takes one push from the budget; `false` when it is spent.
    pub(crate) fn take(&mut self, now: Instant) -> bool {
        let refill = now.saturating_duration_since(self.last).as_secs_f64() * self.rate;
        self.tokens = (self.tokens + refill).min(self.rate * 2.0);
        self.last = now;
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
    pub(crate) fn new(rate_per_sec: u32, now: Instant) -> Self {
        Self(PushBudget::new(rate_per_sec, now))
    }

    /// Takes one control frame from the budget; `false` when it is spent.
    pub(crate) fn take(&mut self, now: Instant) -> bool {
        self.0.take(now)
    }
}

/// Unusable frames per [`STRIKE_WINDOW`]; more than `limit` ends the socket.
pub(crate) struct Strikes {
    limit: u32,
    window_start: Instant,
    count: u32,
}

/// The window strikes are counted in.
pub(crate) const STRIKE_WINDOW: Duration = Duration::from_secs(60);

impl Strikes {
    pub(crate) fn new(limit: u32, now: Instant) -> Self {
        Self {
            limit,
            window_start: now,
            count: 0,
        }
    }

    /// Counts one; `true` when this one is over the limit.
    pub(crate) fn strike(&mut self, now: Instant) -> bool {
        if now.saturating_duration_since(self.window_start) > STRIKE_WINDOW {
            self.window_start = now;
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
        let t0 = Instant::now();
        let mut budget = PushBudget::new(5, t0);
        assert_eq!((0..10).filter(|_| budget.take(t0)).count(), 10);
        assert!(!budget.take(t0), "the burst is spent");
        assert!(budget.take(t0 + Duration::from_millis(200)), "one refilled");
        assert!(!budget.take(t0 + Duration::from_millis(200)));
        let later = t0 + Duration::from_secs(60);
        assert_eq!(
            (0..100).filter(|_| budget.take(later)).count(),
            10,
            "refill stops at the burst"
        );
    }

    #[test]
    fn the_control_budget_is_its_own_generous_bucket() {
        let t0 = Instant::now();
        let mut control = ControlBudget::new(CONTROL_RATE_PER_SEC, t0);
        let burst = 2 * CONTROL_RATE_PER_SEC as usize;
        assert_eq!((0..burst * 10).filter(|_| control.take(t0)).count(), burst);
        let one_second = t0 + Duration::from_secs(1);
        assert_eq!(
            (0..burst).filter(|_| control.take(one_second)).count(),
            CONTROL_RATE_PER_SEC as usize
        );
    }

    #[test]
    fn strikes_over_the_limit_in_a_window_end_the_socket_and_the_window_resets() {
        let t0 = Instant::now();
        let mut strikes = Strikes::new(3, t0);
        assert!(!(0..3).any(|_| strikes.strike(t0)));
        assert!(strikes.strike(t0), "the fourth in the window is over");
        let next = t0 + STRIKE_WINDOW + Duration::from_secs(1);
        assert!(!strikes.strike(next), "a new window starts from zero");
    }
}
