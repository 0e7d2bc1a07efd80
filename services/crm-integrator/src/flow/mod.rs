//! How hard the integrator pushes the CRM, per replica: the request concurrency limit and each
//! request's deadline ([`limiter`]), the pause a CRM asks for and the circuit breaker that stops
//! sending while the CRM is down ([`gate`]), and the messages in hand ([`slots`]). The pause is
//! shared by the fleet through `fleet.rs`; what each answer means is decided in `policy.rs`.

mod capacity;
mod gate;
mod limiter;
mod slots;

pub use gate::{Admission, Gate};
pub use limiter::{Limiter, Permit};
pub use slots::{Parked, Slot, Slots, message_capacity};

/// The fault mix the issue measures (20% 5xx, 5% 429, 2% timeouts, the rest answered), one
/// answer per call, from a seeded generator.
#[cfg(test)]
fn fault_mix(rng: &mut impl rand::Rng) -> crate::policy::Signal {
    use crate::policy::Signal;
    match rng.random::<f64>() {
        r if r < 0.20 => Signal::Failed,
        r if r < 0.25 => Signal::RateLimited,
        r if r < 0.27 => Signal::TimedOut,
        _ => Signal::Answered,
    }
}
