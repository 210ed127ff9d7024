//! Prometheus text format: the one metric type that needs more than a
//! number, the histogram.

use std::fmt::Write;

/// Upper bounds in seconds: from a fast push (milliseconds) to a slow boot
/// (minutes).
const BOUNDS: [f64; 15] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Histogram {
    /// Per bound, observations at or below it (not cumulative).
    counts: [u64; BOUNDS.len()],
    count: u64,
    sum_seconds: f64,
}

impl Histogram {
    pub fn observe_ms(&mut self, ms: u64) {
        let seconds = ms as f64 / 1000.0;
        if let Some(i) = BOUNDS.iter().position(|b| seconds <= *b) {
            self.counts[i] += 1;
        }
        self.count += 1;
        self.sum_seconds += seconds;
    }

    /// Appends the family `name` in Prometheus text format.
    pub fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (bound, n) in BOUNDS.iter().zip(self.counts) {
            cumulative += n;
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum {}", self.sum_seconds);
        let _ = writeln!(out, "{name}_count {}", self.count);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_cumulative_and_inf_counts_everything() {
        let mut h = Histogram::default();
        for ms in [3, 40, 40, 900_000] {
            h.observe_ms(ms);
        }
        let mut out = String::new();
        h.render(&mut out, "x_seconds", "Test.");
        assert!(out.contains("# TYPE x_seconds histogram"));
        assert!(out.contains("x_seconds_bucket{le=\"0.005\"} 1\n"));
        assert!(out.contains("x_seconds_bucket{le=\"0.05\"} 3\n"));
        assert!(out.contains("x_seconds_bucket{le=\"300\"} 3\n"));
        assert!(out.contains("x_seconds_bucket{le=\"+Inf\"} 4\n"));
        assert!(out.contains("x_seconds_count 4\n"));
        assert!(out.contains("x_seconds_sum 900.083\n"), "{out}");
    }
}
