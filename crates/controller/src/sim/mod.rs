//! A simulated AWS account at scale, in-process, behind the `AutoScaling`
//! trait: for benchmarks and tests that need thousands of instances, which
//! the emulator cannot list quickly (moto takes about 0.6 s of Python per
//! DescribeInstances page of 100 out of 1,000 instances).
//!
//! ```text
//!  fleet::SimFleet        the account: groups, instances, lifecycle states,
//!        │                churn (1 % replaced a minute), hooks that wait
//!        ▼ (one lock, taken once per call, never across a sleep)
//!  autoscaling::SimAutoScaling ── impl AutoScaling ──► reconcile::Reconciler
//!        │                the real listing's call pattern: pages of 100,
//!        ▼                two rounds, counted in the same `CallCount`
//!  calls::Calls           what each call costs: latency per page, a token
//!                         bucket that throttles, the SDK's retries
//! ```
//!
//! Time is injected: the account moves only when `SimFleet::advance` is
//! called, so a benchmark decides how much churn lies between two listings;
//! only call latency is real time (a `tokio` sleep).
//!
//! What it does not model: the SDK's own work (HTTP, XML parsing of the
//! answers), which the real listing pays on top of what is measured here.

pub mod autoscaling;
pub mod calls;
pub mod fleet;

pub use autoscaling::SimAutoScaling;
pub use calls::{Calls, Latency, Throttle};
pub use fleet::{FleetSpec, SimFleet};

/// A small deterministic generator (SplitMix64), so that two runs with the
/// same seed churn the same instances and no crate is needed for it.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n` > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}
