//! Choosing an endpoint for a request.
//!
//! Power of two choices (Mitzenmacher, "The Power of Two Choices in
//! Randomized Load Balancing", 2001): sample two endpoints at random, send to
//! the one with fewer requests in flight. Nearly as good as least-loaded,
//! without scanning or coordinating, and it steers around a slow endpoint
//! because its requests pile up.

use std::cell::Cell;
use std::hash::{BuildHasher, RandomState};
use std::str::FromStr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::time::Instant;

use super::table::{Endpoint, ServiceEndpoints};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Balance {
    /// Power of two choices on in-flight requests.
    #[default]
    P2c,
    RoundRobin,
}

impl FromStr for Balance {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "p2c" => Ok(Balance::P2c),
            "round-robin" => Ok(Balance::RoundRobin),
            _ => Err(format!("{s:?}: expected p2c or round-robin")),
        }
    }
}

impl Balance {
    /// An endpoint for the next request, never `avoid` (the endpoint that
    /// just refused a connection) unless it is the only one. Ejected
    /// endpoints are skipped while any other is left: the registry's health
    /// checks stay the authority, so when passive health would leave nothing,
    /// the registry's word wins.
    pub fn pick(
        self,
        service: &ServiceEndpoints,
        avoid: Option<&Endpoint>,
        now: Instant,
    ) -> Option<Arc<Endpoint>> {
        RNG.with(|state| {
            let mut rng = Rng(state.get());
            let picked = self.pick_with(service, avoid, now, &mut rng);
            state.set(rng.0);
            picked
        })
    }

    /// `pick`, with its random draws from `rng`: a test passes a seeded one
    /// to make them the same on every run.
    pub fn pick_with(
        self,
        service: &ServiceEndpoints,
        avoid: Option<&Endpoint>,
        now: Instant,
        rng: &mut Rng,
    ) -> Option<Arc<Endpoint>> {
        let eps = &service.endpoints;
        let usable =
            |b: &Arc<Endpoint>| !avoid.is_some_and(|a| std::ptr::eq(a, &**b)) && !b.is_ejected(now);
        match eps.len() {
            0 => None,
            1 => (avoid.is_none()).then(|| eps[0].clone()),
            n => {
                let picked = match self {
                    Balance::RoundRobin => {
                        let start = service.next.fetch_add(1, Ordering::Relaxed);
                        (0..n).map(|i| &eps[(start + i) % n]).find(|b| usable(b))
                    }
                    Balance::P2c => {
                        let a = random_usable(eps, &usable, rng);
                        let b = a.and_then(|a| {
                            random_usable(
                                eps,
                                &|b: &Arc<Endpoint>| !Arc::ptr_eq(a, b) && usable(b),
                                rng,
                            )
                        });
                        match (a, b) {
                            (Some(a), Some(b)) => Some(
                                if b.in_flight.load(Ordering::Relaxed)
                                    < a.in_flight.load(Ordering::Relaxed)
                                {
                                    b
                                } else {
                                    a
                                },
                            ),
                            (a, _) => a,
                        }
                    }
                };
                picked
                    .or_else(|| {
                        eps.iter()
                            .find(|b| !avoid.is_some_and(|a| std::ptr::eq(a, &***b)))
                    })
                    .cloned()
            }
        }
    }
}

/// A random endpoint that passes `ok`: a few random draws, then a scan from a
/// random start, so the common case allocates nothing and stays O(1).
fn random_usable<'a>(
    eps: &'a [Arc<Endpoint>],
    ok: &dyn Fn(&Arc<Endpoint>) -> bool,
    rng: &mut Rng,
) -> Option<&'a Arc<Endpoint>> {
    let n = eps.len();
    for _ in 0..4 {
        let b = &eps[rng.below(n)];
        if ok(b) {
            return Some(b);
        }
    }
    let start = rng.below(n);
    (0..n).map(|i| &eps[(start + i) % n]).find(|b| ok(b))
}

thread_local! {
    /// Each proxy thread's own draws, so they never contend.
    static RNG: Cell<u64> = Cell::new(RandomState::new().hash_one(0u64) | 1);
}

/// xorshift64*: plenty for load balancing, small enough to own rather than
/// take a dependency for, and seedable so that tests are deterministic.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn seeded(seed: u64) -> Rng {
        // Any state but 0, which xorshift never leaves.
        Rng(seed | 1)
    }

    /// A number in `0..n`.
    fn below(&mut self, n: usize) -> usize {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 32) as usize % n
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    fn service(n: usize) -> ServiceEndpoints {
        ServiceEndpoints {
            name: "users".into(),
            endpoints: (0..n)
                .map(|i| {
                    Arc::new(Endpoint::new(
                        "users",
                        &format!("i-{i}"),
                        format!("127.0.0.{}:80", i + 1).parse().unwrap(),
                    ))
                })
                .collect(),
            next: AtomicUsize::new(0),
        }
    }

    /// The instances `n` picks choose, with the draws of `seed`.
    fn picks(s: &ServiceEndpoints, seed: u64, n: usize) -> Vec<String> {
        let mut rng = Rng::seeded(seed);
        (0..n)
            .map(|_| {
                let b = Balance::P2c.pick_with(s, None, Instant::now(), &mut rng);
                b.unwrap().instance.clone()
            })
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn p2c_picks_the_less_loaded_of_two() {
        let s = service(2);
        s.endpoints[0].in_flight.store(5, Ordering::Relaxed);
        assert!(picks(&s, 7, 100).iter().all(|i| i == "i-1"));
        // Over many endpoints the loaded one loses every comparison it
        // enters, and the others share the load.
        let s = service(4);
        s.endpoints[0].in_flight.store(5, Ordering::Relaxed);
        let chosen = picks(&s, 7, 4000);
        assert_eq!(chosen.iter().filter(|i| *i == "i-0").count(), 0);
        for idle in ["i-1", "i-2", "i-3"] {
            let share = chosen.iter().filter(|i| *i == idle).count();
            assert!((1000..1700).contains(&share), "{idle}: {share} of 4000");
        }
        // The same seed, the same picks: the test sees one sequence only.
        assert_eq!(picks(&s, 7, 4000), chosen);
    }

    #[tokio::test(start_paused = true)]
    async fn round_robin_visits_each_in_turn_and_skips_ejected() {
        let s = service(3);
        let order: Vec<String> = (0..6)
            .map(|_| {
                Balance::RoundRobin
                    .pick(&s, None, Instant::now())
                    .unwrap()
                    .instance
                    .clone()
            })
            .collect();
        assert_eq!(order, ["i-0", "i-1", "i-2", "i-0", "i-1", "i-2"]);
        let now = Instant::now();
        for _ in 0..super::super::table::EJECT_AFTER {
            s.endpoints[1].record(super::super::table::Outcome::ConnectFailure, now);
        }
        for _ in 0..10 {
            let b = Balance::RoundRobin.pick(&s, None, now).unwrap();
            assert_ne!(b.instance, "i-1");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_retry_avoids_the_endpoint_that_failed_and_all_ejected_still_routes() {
        let s = service(2);
        let now = Instant::now();
        for _ in 0..50 {
            let b = Balance::P2c.pick(&s, Some(&s.endpoints[0]), now).unwrap();
            assert_eq!(b.instance, "i-1");
        }
        let one = service(1);
        assert!(
            Balance::P2c
                .pick(&one, Some(&one.endpoints[0]), now)
                .is_none(),
            "no other endpoint to retry on"
        );
        for b in &s.endpoints {
            for _ in 0..super::super::table::EJECT_AFTER {
                b.record(super::super::table::Outcome::ConnectFailure, now);
            }
        }
        assert!(
            Balance::P2c.pick(&s, None, now).is_some(),
            "the registry's health stays the authority"
        );
    }
}
