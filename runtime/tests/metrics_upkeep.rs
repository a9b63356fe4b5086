//! Histogram samples do not pile up in a server nobody scrapes: the recorder
//! folds them into their buckets on its own (`admin::metrics_handle`).
//!
//! Its own test binary: it reads the bytes the process holds from its
//! allocator's statistics.

#![allow(
    clippy::expect_used,
    reason = "integration test: a failed step is a failed test"
)]

use std::time::{Duration, Instant};

// jemalloc, whose statistics say how many bytes the process holds.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Bytes allocated and not yet freed, process-wide.
fn live() -> usize {
    tikv_jemalloc_ctl::epoch::advance().expect("jemalloc epoch");
    tikv_jemalloc_ctl::stats::allocated::read().expect("jemalloc stats")
}

#[test]
fn histogram_samples_are_folded_without_a_scrape() {
    quckchat_runtime::admin::metrics_handle();
    let before = live();
    const SAMPLES: usize = 2_000_000;
    for i in 0..SAMPLES {
        metrics::histogram!("quckchat_upkeep_test_seconds").record((i % 100) as f64 * 1e-4);
    }
    let held = live().saturating_sub(before);
    // Each sample is kept (8 bytes) until folded.
    assert!(held >= SAMPLES * 8, "samples held: {held} B");
    // Nothing renders `/metrics` here; the upkeep runs every 5 s.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut extra = 0;
    loop {
        let now = live().saturating_sub(before);
        if now < held / 10 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still {now} B held of {held} B after 20 s without a scrape"
        );
        // A server keeps recording: the buckets' freed blocks are reclaimed
        // as their users move on (crossbeam's epochs).
        metrics::histogram!("quckchat_upkeep_test_seconds").record(0.0);
        extra += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    // Folded, not lost: every sample is counted.
    let text = quckchat_runtime::admin::metrics_handle().render();
    assert!(
        text.contains(&format!(
            "quckchat_upkeep_test_seconds_count {}",
            SAMPLES + extra
        )),
        "{}",
        text.lines()
            .filter(|l| l.contains("upkeep_test"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}
