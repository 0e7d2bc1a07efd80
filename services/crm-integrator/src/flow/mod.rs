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
