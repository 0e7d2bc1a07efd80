//! The semaphore under the request slots and the places in hand.

use std::sync::Arc;

use parking_lot::Mutex;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// A semaphore whose size changes while permits are out: a waiter is woken only when a permit is
/// there for it (one waiter per freed permit, in order), never all of them to race for it.
#[derive(Debug)]
pub(super) struct Capacity {
    semaphore: Arc<Semaphore>,
    sizes: Mutex<Sizes>,
}

#[derive(Debug, Default)]
struct Sizes {
    target: usize,
    /// Permits out that must not come back, because the size shrank below what was out.
    owed: usize,
}

impl Capacity {
    pub(super) fn new(size: usize) -> Self {
        Capacity {
            semaphore: Arc::new(Semaphore::new(size)),
            sizes: Mutex::new(Sizes {
                target: size,
                owed: 0,
            }),
        }
    }

    pub(super) fn resize(&self, size: usize) {
        let mut sizes = self.sizes.lock();
        if size > sizes.target {
            let grow = size - sizes.target;
            let settled = grow.min(sizes.owed);
            sizes.owed -= settled;
            self.semaphore.add_permits(grow - settled);
        } else if size < sizes.target {
            let shrink = sizes.target - size;
            let forgotten = self.semaphore.forget_permits(shrink);
            sizes.owed += shrink - forgotten;
        }
        sizes.target = size;
    }

    pub(super) async fn acquire(&self) -> OwnedSemaphorePermit {
        self.semaphore
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed")
    }

    pub(super) fn release(&self, permit: OwnedSemaphorePermit) {
        let mut sizes = self.sizes.lock();
        if sizes.owed > 0 {
            sizes.owed -= 1;
            permit.forget();
        } else {
            drop(permit);
        }
    }

    /// One permit more than the size, until [`Capacity::take_back`].
    pub(super) fn lend(&self) {
        self.semaphore.add_permits(1);
    }

    /// Takes a lent permit back now: a free one if there is one, else the next one released.
    pub(super) fn take_back(&self) {
        match self.semaphore.clone().try_acquire_owned() {
            Ok(permit) => permit.forget(),
            Err(_) => self.sizes.lock().owed += 1,
        }
    }
}
