//! The messages a replica holds: taken from the consumer and not yet settled.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::OwnedSemaphorePermit;

use super::capacity::Capacity;

/// Messages allowed in hand for a request limit. A record spends about as long in its ledger and
/// outcome round trips to NATS as at the CRM, so twice the request limit keeps the CRM at its limit
/// while the other half is in those phases; what waits for a request slot waits about one request
/// latency, small next to the ack wait. Records waiting for a retry (a `Retry-After`, a backoff,
/// a short pause) are not counted: as many again may wait beside these (see [`Slots::park`]).
pub fn message_capacity(request_limit: usize) -> usize {
    request_limit * 2 + 16
}

/// Messages taken from the consumer and not yet settled. What is pulled but not started stays
/// small next to the ack wait; a record waiting for its retry (a `Retry-After`, a backoff, a
/// pause) hands its place to a new message while it waits, up to as many waiting as there are
/// places, so records that wait never starve the CRM of work.
#[derive(Debug)]
pub struct Slots {
    active: Capacity,
    in_hand: AtomicUsize,
    parked: AtomicUsize,
    max_parked: AtomicUsize,
}

/// A message's place in hand; dropping it frees the place.
#[derive(Debug)]
pub struct Slot {
    slots: Arc<Slots>,
    permit: Option<OwnedSemaphorePermit>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(permit) = self.permit.take() {
            self.slots.in_hand.fetch_sub(1, Ordering::AcqRel);
            self.slots.active.release(permit);
        }
    }
}

/// A record waiting outside the places in hand; [`Parked::resume`] takes a place again.
#[derive(Debug)]
pub struct Parked<'a> {
    slots: &'a Slots,
    resumed: bool,
}

impl Parked<'_> {
    /// Waits for a place among the messages in hand again.
    pub async fn resume(mut self) {
        self.slots.active.acquire().await.forget();
        self.slots.parked.fetch_sub(1, Ordering::AcqRel);
        self.resumed = true;
    }
}

impl Drop for Parked<'_> {
    fn drop(&mut self) {
        if !self.resumed {
            // Leaving without waiting for a place (shutdown, an error): take the place back at
            // once, or from the next message that leaves.
            self.slots.parked.fetch_sub(1, Ordering::AcqRel);
            self.slots.active.take_back();
        }
    }
}

impl Slots {
    pub fn new(capacity: usize) -> Arc<Self> {
        Arc::new(Slots {
            active: Capacity::new(capacity),
            in_hand: AtomicUsize::new(0),
            parked: AtomicUsize::new(0),
            max_parked: AtomicUsize::new(capacity),
        })
    }

    /// Places in hand, and as many for waiting records. Not more: every message in hand is
    /// stuck for the ack wait (and its claim for the lease) if this replica dies.
    pub fn resize(&self, capacity: usize) {
        self.active.resize(capacity);
        self.max_parked.store(capacity, Ordering::Release);
    }

    pub async fn acquire(self: &Arc<Self>) -> Slot {
        let permit = self.active.acquire().await;
        self.in_hand.fetch_add(1, Ordering::AcqRel);
        Slot {
            slots: self.clone(),
            permit: Some(permit),
        }
    }

    /// Lets a new message in while this record waits; `None` when as many already wait as
    /// there are places (the caller hands the record back to the server instead).
    pub fn park(&self) -> Option<Parked<'_>> {
        let max = self.max_parked.load(Ordering::Acquire);
        self.parked
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()?;
        self.active.lend();
        Some(Parked {
            slots: self,
            resumed: false,
        })
    }

    /// Messages in hand, waiting ones included.
    pub fn in_use(&self) -> usize {
        self.in_hand.load(Ordering::Acquire)
    }

    pub fn parked(&self) -> usize {
        self.parked.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn slots_block_at_capacity_and_a_waiting_record_lets_another_in() {
        let slots = Slots::new(2);
        let a = slots.acquire().await;
        let _b = slots.acquire().await;
        assert!(
            tokio::time::timeout(Duration::from_millis(20), slots.acquire())
                .await
                .is_err()
        );
        // The record behind `a` waits for its Retry-After: a third message may come in.
        let parked = slots.park().expect("room to wait");
        let _c = slots.acquire().await;
        assert_eq!(slots.in_use(), 3);
        // Waiting records are bounded too: two places, two waiting.
        let second = slots.park().expect("a second may wait");
        assert!(slots.park().is_none(), "no third");
        drop(second);
        // Back from its wait, the record needs a place again, and waits for one to free.
        let mut resume = std::pin::pin!(parked.resume());
        assert!(
            tokio::time::timeout(Duration::from_millis(20), &mut resume)
                .await
                .is_err(),
            "no free place yet"
        );
        drop(a);
        tokio::time::timeout(Duration::from_secs(5), resume)
            .await
            .expect("resumed once a place freed");
        assert_eq!(slots.parked(), 0);
    }
}
