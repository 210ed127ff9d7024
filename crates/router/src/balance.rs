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

use super::table::{Backend, ServiceEndpoints};

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
        avoid: Option<&Backend>,
        now: Instant,
    ) -> Option<Arc<Backend>> {
        let eps = &service.endpoints;
        let usable =
            |b: &Arc<Backend>| !avoid.is_some_and(|a| std::ptr::eq(a, &**b)) && !b.is_ejected(now);
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
                        let a = random_usable(eps, &usable);
                        let b = a.and_then(|a| {
                            random_usable(eps, &|b: &Arc<Backend>| !Arc::ptr_eq(a, b) && usable(b))
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
    eps: &'a [Arc<Backend>],
    ok: &dyn Fn(&Arc<Backend>) -> bool,
) -> Option<&'a Arc<Backend>> {
    let n = eps.len();
    for _ in 0..4 {
        let b = &eps[random(n)];
        if ok(b) {
            return Some(b);
        }
    }
    let start = random(n);
    (0..n).map(|i| &eps[(start + i) % n]).find(|b| ok(b))
}

thread_local! {
    static RNG: Cell<u64> = Cell::new(RandomState::new().hash_one(0u64) | 1);
}

/// xorshift64*: plenty for load balancing, and per thread so it never contends.
fn random(n: usize) -> usize {
    RNG.with(|s| {
        let mut x = s.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        s.set(x);
        (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 32) as usize % n
    })
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
                    Arc::new(Backend::new(
                        "users",
                        &format!("i-{i}"),
                        format!("127.0.0.{}:80", i + 1).parse().unwrap(),
                    ))
                })
                .collect(),
            next: AtomicUsize::new(0),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn p2c_picks_the_less_loaded_of_two() {
        let s = service(2);
        s.endpoints[0].in_flight.store(5, Ordering::Relaxed);
        for _ in 0..100 {
            let b = Balance::P2c.pick(&s, None, Instant::now()).unwrap();
            assert_eq!(b.instance, "i-1");
        }
        // Over many endpoints the loaded one is chosen far less than its share.
        let s = service(4);
        s.endpoints[0].in_flight.store(5, Ordering::Relaxed);
        let busy = (0..4000)
            .filter(|_| {
                Balance::P2c
                    .pick(&s, None, Instant::now())
                    .unwrap()
                    .instance
                    == "i-0"
            })
            .count();
        assert_eq!(busy, 0, "it loses every comparison it enters");
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
