//! Progress of weights being loaded or streamed: an indicatif bar on stderr (drawn only on a
//! terminal) and milestones for the log, so that progress also reaches the head's log and
//! non-interactive runs.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A byte-count bar labelled `what`.
pub fn bar(total: u64, what: String) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
    if let Ok(style) = ProgressStyle::with_template(
        "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(what);
    bar
}

/// Every 25 % of `total`, once each.
pub struct Milestones {
    total: u64,
    next: u64,
}

impl Milestones {
    pub fn new(total: u64) -> Self {
        Milestones { total, next: 25 }
    }

    /// The percentage just reached, if `done` passed the next milestone.
    pub fn passed(&mut self, done: u64) -> Option<u64> {
        if self.total == 0 || self.next > 100 {
            return None;
        }
        let pct = done.saturating_mul(100) / self.total;
        if pct < self.next {
            return None;
        }
        let reached = pct - pct % 25;
        self.next = reached + 25;
        Some(reached)
    }
}
