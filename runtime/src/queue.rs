//! A bounded queue from many producers to one consumer that holds no memory
//! while empty.
//!
//! Every connected socket has one (its outbound deliveries) and every
//! in-process bus subscription has one, and nearly all of them are empty
//! nearly all the time. tokio's `mpsc` allocates a block of 32 slots when the
//! channel is made (~1 KiB for a socket's queue) and keeps its blocks after
//! use; flume's allocates its waiter on every wait. Here the items sit in a
//! `VecDeque` behind a mutex that nobody holds for longer than a push or a
//! pop; it allocates on the first push, and a queue that empties after a
//! burst gives its buffer back. The consumer's waker is an [`AtomicWaker`]:
//! waiting allocates nothing.
//!
//! A consumer that falls behind can be cut off ([`Sender::overflow`]): its
//! queue ends at once, so it learns it while waiting for items and needs no
//! second signal beside the queue.
//!
//! A sender can also raise flags ([`Sender::signal`]) that the consumer reads
//! beside its items ([`Receiver::signals`]): they are not bounded by the
//! capacity and not lost, and cost the consumer no timer or future of its own
//! (a gateway sweeps its sockets for idle ones and tells them to drain this
//! way).

use std::collections::VecDeque;
use std::future::poll_fn;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use futures::task::AtomicWaker;

/// A queue's buffer is given back when it empties holding more slots than
/// this; a queue that sees one item at a time keeps its few.
const KEPT_SLOTS: usize = 8;

/// A bounded queue holding at most `capacity` items.
pub fn bounded<T>(capacity: usize) -> (Sender<T>, Receiver<T>) {
    let shared = Arc::new(Shared {
        items: Mutex::new(VecDeque::new()),
        capacity,
        waker: AtomicWaker::new(),
        senders: AtomicUsize::new(1),
        receiver_gone: AtomicBool::new(false),
        overflowed: AtomicBool::new(false),
        signals: AtomicU8::new(0),
    });
    (
        Sender {
            shared: shared.clone(),
        },
        Receiver { shared },
    )
}

struct Shared<T> {
    items: Mutex<VecDeque<T>>,
    capacity: usize,
    waker: AtomicWaker,
    senders: AtomicUsize,
    receiver_gone: AtomicBool,
    /// A sender cut the consumer off ([`Sender::overflow`]).
    overflowed: AtomicBool,
    /// Flags raised and not yet read ([`Sender::signal`]).
    signals: AtomicU8,
}

impl<T> Shared<T> {
    fn items(&self) -> MutexGuard<'_, VecDeque<T>> {
        // A panic while holding the lock leaves a consistent VecDeque.
        self.items.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Why [`Sender::try_send`] gave the item back.
#[derive(Debug, PartialEq, Eq)]
pub enum TrySendError<T> {
    /// `capacity` items are waiting: the consumer is behind.
    Full(T),
    /// The receiver is gone, or was cut off ([`Sender::overflow`]).
    Closed(T),
}

pub struct Sender<T> {
    shared: Arc<Shared<T>>,
}

impl<T> Clone for Sender<T> {
    fn clone(&self) -> Self {
        self.shared.senders.fetch_add(1, Ordering::Relaxed);
        Self {
            shared: self.shared.clone(),
        }
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        if self.shared.senders.fetch_sub(1, Ordering::AcqRel) == 1 {
            // The last one: a waiting receiver learns the queue has ended.
            self.shared.waker.wake();
        }
    }
}

impl<T> Sender<T> {
    /// Queues `item` without waiting, and wakes the receiver.
    pub fn try_send(&self, item: T) -> Result<(), TrySendError<T>> {
        {
            let mut items = self.shared.items();
            // Under the lock: the receiver marks itself gone, then clears the
            // queue under it, so nothing is left behind after the clear.
            if self.is_closed() || self.shared.overflowed.load(Ordering::Acquire) {
                return Err(TrySendError::Closed(item));
            }
            if items.len() >= self.shared.capacity {
                return Err(TrySendError::Full(item));
            }
            items.push_back(item);
        }
        self.shared.waker.wake();
        Ok(())
    }

    /// The receiver is gone: nothing sent will be read.
    pub fn is_closed(&self) -> bool {
        self.shared.receiver_gone.load(Ordering::Acquire)
    }

    /// Cuts the consumer off because it fell behind: the queue ends for it
    /// now, queued items unread ([`Receiver::recv`] returns `None`), and
    /// later sends fail. Whether this call did it (the first of any
    /// sender's).
    pub fn overflow(&self) -> bool {
        if self.shared.overflowed.swap(true, Ordering::AcqRel) {
            return false;
        }
        self.shared.waker.wake();
        true
    }

    /// Raises the flags `bits` for the consumer and wakes it; it reads them
    /// once with [`Receiver::signals`], however many times they were raised.
    pub fn signal(&self, bits: u8) {
        if self.shared.signals.fetch_or(bits, Ordering::AcqRel) & bits != bits {
            self.shared.waker.wake();
        }
    }
}

pub struct Receiver<T> {
    shared: Arc<Shared<T>>,
}

impl<T> Drop for Receiver<T> {
    fn drop(&mut self) {
        self.shared.receiver_gone.store(true, Ordering::Release);
        // What was queued is never read: free it now, not with the last sender.
        drop(std::mem::take(&mut *self.shared.items()));
    }
}

impl<T> Receiver<T> {
    /// The next item, if one is queued.
    pub fn try_recv(&self) -> Option<T> {
        let mut items = self.shared.items();
        let item = items.pop_front();
        if items.is_empty() && items.capacity() > KEPT_SLOTS {
            *items = VecDeque::new();
        }
        item
    }

    /// Whether a sender cut this consumer off ([`Sender::overflow`]).
    pub fn overflowed(&self) -> bool {
        self.shared.overflowed.load(Ordering::Acquire)
    }

    /// The next item; `None` once every sender is gone and the queue is
    /// empty, or once a sender cut the consumer off.
    pub fn poll_recv(&self, cx: &mut Context<'_>) -> Poll<Option<T>> {
        if self.overflowed() {
            return Poll::Ready(None);
        }
        if let Some(item) = self.try_recv() {
            return Poll::Ready(Some(item));
        }
        self.shared.waker.register(cx.waker());
        if self.overflowed() {
            return Poll::Ready(None);
        }
        // Again after registering: a push between the first look and the
        // registration woke nobody.
        if let Some(item) = self.try_recv() {
            return Poll::Ready(Some(item));
        }
        if self.shared.senders.load(Ordering::Acquire) == 0 {
            // The last sender may have pushed before it went.
            return Poll::Ready(self.try_recv());
        }
        Poll::Pending
    }

    /// Waits for the next item; `None` once every sender is gone and the
    /// queue is empty, or once a sender cut the consumer off.
    pub async fn recv(&self) -> Option<T> {
        poll_fn(|cx| self.poll_recv(cx)).await
    }

    /// The flags raised since the last call, cleared; `Pending` while none
    /// are. Shares the waker of [`Receiver::poll_recv`]: poll both from the
    /// same task.
    pub fn poll_signals(&self, cx: &mut Context<'_>) -> Poll<u8> {
        let bits = self.shared.signals.swap(0, Ordering::AcqRel);
        if bits != 0 {
            return Poll::Ready(bits);
        }
        self.shared.waker.register(cx.waker());
        // Again after registering: a flag raised in between woke nobody.
        match self.shared.signals.swap(0, Ordering::AcqRel) {
            0 => Poll::Pending,
            bits => Poll::Ready(bits),
        }
    }

    /// Waits for flags raised by a sender ([`Sender::signal`]).
    pub async fn signals(&self) -> u8 {
        poll_fn(|cx| self.poll_signals(cx)).await
    }

    /// Gives the buffer back if nothing is queued: for a consumer about to
    /// wait long (an idle socket), where the few slots kept for a steady
    /// trickle ([`KEPT_SLOTS`]) would be kept for nothing.
    pub fn release_if_empty(&self) {
        let mut items = self.shared.items();
        if items.is_empty() && items.capacity() > 0 {
            *items = VecDeque::new();
        }
    }

    /// Slots the queue's buffer holds now (0 while it holds no memory).
    pub fn allocated_slots(&self) -> usize {
        self.shared.items().capacity()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn an_empty_queue_holds_no_buffer_and_gives_a_burst_back() {
        let (tx, rx) = bounded::<u64>(1024);
        assert_eq!(rx.allocated_slots(), 0);
        tx.try_send(1).unwrap();
        assert_eq!(rx.try_recv(), Some(1));
        // A queue that sees one item at a time keeps its few slots.
        assert!(rx.allocated_slots() <= KEPT_SLOTS);
        for i in 0..100 {
            tx.try_send(i).unwrap();
        }
        assert!(rx.allocated_slots() >= 100);
        let drained: Vec<u64> = std::iter::from_fn(|| rx.try_recv()).collect();
        assert_eq!(drained, (0..100).collect::<Vec<_>>());
        assert_eq!(rx.allocated_slots(), 0);
        tx.try_send(1).unwrap();
        rx.release_if_empty();
        assert!(
            rx.allocated_slots() > 0,
            "an item is queued: the buffer stays"
        );
        assert_eq!(rx.try_recv(), Some(1));
        rx.release_if_empty();
        assert_eq!(rx.allocated_slots(), 0);
    }

    #[test]
    fn a_full_queue_gives_the_item_back() {
        let (tx, rx) = bounded(2);
        tx.try_send('a').unwrap();
        tx.try_send('b').unwrap();
        assert_eq!(tx.try_send('c'), Err(TrySendError::Full('c')));
        assert_eq!(rx.try_recv(), Some('a'));
        tx.try_send('c').unwrap();
        assert_eq!(rx.try_recv(), Some('b'));
        assert_eq!(rx.try_recv(), Some('c'));
        assert_eq!(rx.try_recv(), None);
    }

    #[test]
    fn sending_to_a_dropped_receiver_fails_and_queued_items_are_freed() {
        let (tx, rx) = bounded(8);
        let item = Arc::new(());
        tx.try_send(item.clone()).unwrap();
        assert!(!tx.is_closed());
        drop(rx);
        assert!(tx.is_closed());
        assert_eq!(Arc::strong_count(&item), 1, "the queued clone was freed");
        assert!(matches!(
            tx.try_send(item.clone()),
            Err(TrySendError::Closed(_))
        ));
    }

    #[tokio::test]
    async fn a_consumer_cut_off_learns_it_while_waiting_and_later_sends_fail() {
        let (tx, rx) = bounded(2);
        tx.try_send('a').unwrap();
        assert_eq!(rx.recv().await, Some('a'));
        let waiter = tokio::spawn(async move {
            let ended = rx.recv().await;
            (ended, rx.overflowed())
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished());
        let other = tx.clone();
        assert!(other.overflow(), "the first cut");
        assert!(!tx.overflow(), "already cut off");
        let (ended, overflowed) = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("woken by the cut")
            .unwrap();
        assert_eq!(ended, None);
        assert!(overflowed);
        assert_eq!(tx.try_send('b'), Err(TrySendError::Closed('b')));
    }

    #[test]
    fn items_queued_before_the_cut_are_not_read() {
        let (tx, rx) = bounded(8);
        tx.try_send(1).unwrap();
        tx.overflow();
        let mut cx = Context::from_waker(futures::task::noop_waker_ref());
        assert_eq!(rx.poll_recv(&mut cx), Poll::Ready(None));
    }

    #[tokio::test]
    async fn a_waiting_receiver_is_woken_by_a_send_from_another_task() {
        let (tx, rx) = bounded(8);
        let waiter = tokio::spawn(async move { rx.recv().await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished());
        tx.try_send(7).unwrap();
        let got = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("woken")
            .unwrap();
        assert_eq!(got, Some(7));
    }

    #[tokio::test]
    async fn the_queue_ends_when_the_last_sender_goes_after_its_items() {
        let (tx, rx) = bounded(8);
        let tx2 = tx.clone();
        tx.try_send(1).unwrap();
        drop(tx);
        tx2.try_send(2).unwrap();
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            while let Some(v) = rx.recv().await {
                got.push(v);
            }
            got
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!reader.is_finished(), "a sender is still there");
        drop(tx2);
        let got = tokio::time::timeout(Duration::from_secs(5), reader)
            .await
            .expect("ended")
            .unwrap();
        assert_eq!(got, vec![1, 2]);
    }

    #[tokio::test]
    async fn signals_wake_the_consumer_once_and_pass_a_full_queue() {
        let (tx, rx) = bounded(1);
        tx.try_send(1).unwrap();
        let mut cx = Context::from_waker(futures::task::noop_waker_ref());
        assert_eq!(rx.poll_signals(&mut cx), Poll::Pending);
        tx.signal(0b01);
        tx.clone().signal(0b10);
        tx.signal(0b01);
        assert_eq!(rx.poll_signals(&mut cx), Poll::Ready(0b11), "both, once");
        assert_eq!(rx.poll_signals(&mut cx), Poll::Pending);
        assert_eq!(rx.try_recv(), Some(1), "the item is still there");
        let waiter = tokio::spawn(async move { rx.signals().await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished());
        tx.signal(0b100);
        let got = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("woken by the flag")
            .unwrap();
        assert_eq!(got, 0b100);
    }

    #[test]
    fn many_producers_lose_nothing_under_the_bound() {
        let (tx, rx) = bounded(100_000);
        let threads: Vec<_> = (0..4u64)
            .map(|t| {
                let tx = tx.clone();
                std::thread::spawn(move || {
                    for i in 0..10_000u64 {
                        tx.try_send(t * 1_000_000 + i).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let mut got: Vec<u64> = std::iter::from_fn(|| rx.try_recv()).collect();
        assert_eq!(got.len(), 40_000);
        // Each producer's items stay in its order.
        for t in 0..4u64 {
            let mine: Vec<u64> = got.iter().copied().filter(|v| v / 1_000_000 == t).collect();
            assert!(mine.windows(2).all(|w| w[0] < w[1]));
        }
        got.sort_unstable();
        got.dedup();
        assert_eq!(got.len(), 40_000);
    }
}
