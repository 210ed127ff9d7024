//! Which controller replica the router talks to. With several replicas
//! (see the controller's `lease`), only the leader serves: a follower
//! answers a subscription with a redirect to the leader's advertised URL,
//! or 503 while it knows none. The router follows the redirect, and after
//! any other failure tries the next configured URL, so it ends up at the
//! leader whether it was given one URL (a load balancer or a Kubernetes
//! Service in front of every replica) or the list of replicas. Acks go
//! wherever the subscription is.

use std::sync::Mutex;

pub struct Controllers {
    /// Base URLs as configured, without trailing slashes.
    configured: Vec<String>,
    inner: Mutex<Current>,
}

struct Current {
    /// Index into `configured` of the last one tried.
    next: usize,
    /// Where subscriptions and acks go now.
    url: String,
}

impl Controllers {
    /// `list`: one base URL or several, separated by commas.
    pub fn new(list: &str) -> Controllers {
        let configured: Vec<String> = list
            .split(',')
            .map(|u| u.trim().trim_end_matches('/').to_owned())
            .filter(|u| !u.is_empty())
            .collect();
        let url = configured.first().cloned().unwrap_or_default();
        Controllers {
            configured,
            inner: Mutex::new(Current { next: 0, url }),
        }
    }

    pub fn current(&self) -> String {
        self.inner.lock().expect("controllers lock").url.clone()
    }

    /// A replica sent us to `location` (a watch URL on the leader): its
    /// scheme and authority become the base. False if it is not a URL.
    pub fn follow(&self, location: &str) -> bool {
        let Ok(uri) = location.parse::<hyper::Uri>() else {
            return false;
        };
        let (Some(scheme), Some(authority)) = (uri.scheme_str(), uri.authority()) else {
            return false;
        };
        self.inner.lock().expect("controllers lock").url = format!("{scheme}://{authority}");
        true
    }

    /// The current one failed or refused: the next configured one.
    pub fn failed(&self) {
        let mut inner = self.inner.lock().expect("controllers lock");
        if self.configured.is_empty() {
            return;
        }
        inner.next = (inner.next + 1) % self.configured.len();
        inner.url = self.configured[inner.next].clone();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_redirect_is_followed_and_a_failure_goes_round_the_list() {
        let c = Controllers::new("http://a:7070/, http://b:7070");
        assert_eq!(c.current(), "http://a:7070");
        assert!(c.follow("http://10.0.0.9:7070/v1/watch?router=r1&protocol=1"));
        assert_eq!(c.current(), "http://10.0.0.9:7070");
        c.failed();
        assert_eq!(c.current(), "http://b:7070");
        c.failed();
        assert_eq!(c.current(), "http://a:7070");
        assert!(!c.follow("/v1/watch"), "no authority: not followed");
        assert_eq!(c.current(), "http://a:7070");
    }
}
