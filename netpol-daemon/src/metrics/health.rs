//! Liveness: the daemon loop stamps a [`Heartbeat`] as each pass begins; `/healthz` fails
//! (503) once the last pass began longer ago than the allowed age (`--liveness-timeout`), so a
//! loop stuck in a sync, a netlink call or a lock gets the pod restarted by its liveness
//! probe. A pass begins at least every `--poll-ms` plus the time of the pass before it (every
//! wait of the source is bounded by the poll interval), so the allowed age only has to cover
//! the longest sync.
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The allowed age of the last pass, unless told otherwise.
pub const DEFAULT_MAX_PASS_AGE: Duration = Duration::from_secs(30);

#[derive(Debug)]
pub struct Heartbeat {
    /// When the last pass began (at first: when the daemon started, which counts as one).
    last: Mutex<Instant>,
    max_age: Mutex<Duration>,
}

impl Default for Heartbeat {
    fn default() -> Self {
        Heartbeat { last: Mutex::new(Instant::now()), max_age: Mutex::new(DEFAULT_MAX_PASS_AGE) }
    }
}

/// What `/healthz` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    /// The last pass began this long ago, within the allowed age.
    Alive(Duration),
    /// The last pass began this long ago, over the allowed age.
    Stuck(Duration),
}

impl Heartbeat {
    /// A pass begins now.
    pub fn beat(&self) {
        self.beat_at(Instant::now());
    }

    /// A pass began at `t` (tests set a past one).
    pub fn beat_at(&self, t: Instant) {
        *self.last.lock().unwrap() = t;
    }

    pub fn set_max_age(&self, d: Duration) {
        *self.max_age.lock().unwrap() = d;
    }

    /// How long before `now` the last pass began.
    pub fn age(&self, now: Instant) -> Duration {
        now.saturating_duration_since(*self.last.lock().unwrap())
    }

    /// The loop's liveness at `now`.
    pub fn check(&self, now: Instant) -> Liveness {
        let age = self.age(now);
        if age > *self.max_age.lock().unwrap() {
            Liveness::Stuck(age)
        } else {
            Liveness::Alive(age)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_loop_is_stuck_once_its_last_pass_is_older_than_allowed() {
        let hb = Heartbeat::default();
        hb.set_max_age(Duration::from_secs(30));
        let t0 = Instant::now();
        hb.beat_at(t0);
        assert_eq!(hb.check(t0 + Duration::from_secs(29)), Liveness::Alive(Duration::from_secs(29)));
        assert_eq!(hb.check(t0 + Duration::from_secs(30)), Liveness::Alive(Duration::from_secs(30)));
        assert_eq!(hb.check(t0 + Duration::from_secs(31)), Liveness::Stuck(Duration::from_secs(31)));
        // A new pass makes it alive again; a clock before the beat counts as no age.
        hb.beat_at(t0 + Duration::from_secs(31));
        assert_eq!(hb.check(t0 + Duration::from_secs(32)), Liveness::Alive(Duration::from_secs(1)));
        assert_eq!(hb.check(t0), Liveness::Alive(Duration::ZERO));
        hb.set_max_age(Duration::from_millis(500));
        assert!(matches!(hb.check(t0 + Duration::from_secs(32)), Liveness::Stuck(_)));
    }
}
