//! First come, first served, per conversation: [`Turns`] hands out turns in
//! the order they are taken, and a turn's holder can wait until every earlier
//! turn of its conversation is over.
//!
//! A send takes its turn and starts its store append in one step (the store
//! assigns `seq` in that order), then waits for the appends before it while
//! its own commits, and publishes after them: `message:new` goes out in seq
//! order without holding anything across the commit, so one group commit
//! carries many sends of one conversation.

use std::hash::{BuildHasher, RandomState};
use std::sync::{Mutex, PoisonError};

use tokio::sync::oneshot;

/// Turns per key, in stripes: keys that share a stripe share one order (a
/// turn waits for an unrelated key's earlier turn, never for long).
pub struct Turns {
    /// Per stripe: the signal the last turn taken gives when it is over.
    tails: Vec<Mutex<Option<oneshot::Receiver<()>>>>,
    hasher: RandomState,
}

/// One turn. Over when dropped — but never before every earlier turn of its
/// stripe is over, even when dropped early (an error, a cancelled task).
#[must_use = "a turn orders nothing unless it is held"]
pub struct Turn {
    before: Option<oneshot::Receiver<()>>,
    over: Option<oneshot::Sender<()>>,
}

impl Turns {
    pub fn new(stripes: usize) -> Self {
        Self {
            tails: (0..stripes.max(1)).map(|_| Mutex::new(None)).collect(),
            hasher: RandomState::new(),
        }
    }

    /// Takes the next turn for `key` and calls `start` before any later turn
    /// of its stripe can be taken: what `start` begins, it begins in turn
    /// order.
    pub fn take<T>(&self, key: &str, start: impl FnOnce() -> T) -> (Turn, T) {
        let stripe = (self.hasher.hash_one(key) % self.tails.len() as u64) as usize;
        let (over, tail) = oneshot::channel();
        let mut last = self.tails[stripe]
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let before = last.replace(tail);
        let started = start();
        drop(last);
        let turn = Turn {
            before,
            over: Some(over),
        };
        (turn, started)
    }
}

impl Turn {
    /// Resolves when every earlier turn of this stripe is over.
    pub async fn wait(&mut self) {
        if let Some(before) = self.before.take() {
            // A sender dropped without sending is an earlier turn that is
            // over as well.
            let _ = before.await;
        }
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        let Some(over) = self.over.take() else {
            return;
        };
        match self.before.take() {
            // Earlier turns are over: so is this one.
            None => drop(over),
            // Dropped before its wait: hand the order on once they are over.
            Some(before) => match tokio::runtime::Handle::try_current() {
                Ok(runtime) => {
                    runtime.spawn(async move {
                        let _ = before.await;
                        drop(over);
                    });
                }
                // No runtime left to wait in: nothing is waiting either.
                Err(_) => drop(over),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;

    /// Records the order in which turns finish.
    async fn finish(log: Arc<Mutex<Vec<u32>>>, mut turn: Turn, id: u32) {
        turn.wait().await;
        log.lock().unwrap().push(id);
    }

    #[tokio::test]
    async fn turns_finish_in_the_order_taken() {
        let turns = Turns::new(1);
        let log = Arc::new(Mutex::new(Vec::new()));
        let taken: Vec<_> = (0..20).map(|i| (turns.take("c", || ()).0, i)).collect();
        // Finish them in reverse: each still waits for the ones before it.
        let tasks: Vec<_> = taken
            .into_iter()
            .rev()
            .map(|(turn, i)| tokio::spawn(finish(log.clone(), turn, i)))
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
        assert_eq!(*log.lock().unwrap(), (0..20).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn a_turn_dropped_early_still_keeps_later_turns_behind_earlier_ones() {
        let turns = Turns::new(1);
        let (mut first, ()) = turns.take("c", || ());
        let (second, ()) = turns.take("c", || ());
        let (mut third, ()) = turns.take("c", || ());
        // The second fails before its wait (an error path): dropped at once.
        drop(second);
        let third_done = tokio::spawn(async move { third.wait().await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            !third_done.is_finished(),
            "the third went ahead of the first because the second was dropped"
        );
        first.wait().await;
        drop(first);
        tokio::time::timeout(Duration::from_secs(5), third_done)
            .await
            .expect("the third turn came once the first was over")
            .unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn start_runs_in_turn_order_across_threads() {
        let turns = Arc::new(Turns::new(1));
        let started = Arc::new(Mutex::new(Vec::new()));
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let (turns, started) = (turns.clone(), started.clone());
                tokio::spawn(async move {
                    let mut mine = Vec::new();
                    for _ in 0..100 {
                        let (turn, n) = turns.take("c", || {
                            let mut s = started.lock().unwrap();
                            s.push(());
                            s.len()
                        });
                        mine.push((turn, n));
                    }
                    mine
                })
            })
            .collect();
        let mut all = Vec::new();
        for task in tasks {
            all.extend(task.await.unwrap());
        }
        // Each turn's wait resolves only after those started before it are
        // over: finishing them in start order never blocks.
        all.sort_by_key(|(_, n)| *n);
        for (mut turn, _) in all {
            tokio::time::timeout(Duration::from_secs(5), turn.wait())
                .await
                .expect("an earlier-started turn was over");
        }
    }

    #[tokio::test]
    async fn different_stripes_do_not_wait_for_each_other() {
        let turns = Turns::new(64);
        let (_held, ()) = turns.take("a", || ());
        // Find a key on another stripe than "a".
        let other = (0..)
            .map(|i| format!("k{i}"))
            .find(|k| {
                let s = |key: &str| turns.hasher.hash_one(key) % 64;
                s(k) != s("a")
            })
            .unwrap();
        let (mut turn, ()) = turns.take(&other, || ());
        tokio::time::timeout(Duration::from_secs(5), turn.wait())
            .await
            .expect("a turn on another stripe waited for an unrelated one");
    }
}
