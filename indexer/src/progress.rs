//! Progress of long steps (embedding, clustering, indexing), shown where the user looks:
//! a bar on a terminal, and when stderr is not a terminal (a log file, CI, Nomad) a log
//! line at least every [`LOG_EVERY`] with done/total, rate and an estimate of the time
//! left, so a run that only leaves a log never goes quiet for minutes.

use std::fmt;
use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

/// How often a non-terminal run logs a progress line (with the line each step logs when
/// it starts, no gap in a log reaches 10 s).
pub const LOG_EVERY: Duration = Duration::from_secs(8);

/// Where progress lines go when nobody watches a bar.
pub type Sink = Box<dyn Fn(&str) + Send + Sync>;

/// One step's progress; dropping it ends the step (the bar is cleared, the ticker stops
/// and a last line says how long the step took).
pub struct Progress {
    bar: ProgressBar,
    shared: Arc<Shared>,
    ticker: Option<JoinHandle<()>>,
}

struct Shared {
    what: String,
    total: u64,
    done: AtomicU64,
    started: Instant,
    stopped: Mutex<bool>,
    wake: Condvar,
    sink: Option<Sink>,
}

impl Shared {
    fn status(&self) -> Status {
        Status::at(
            self.done.load(Ordering::Relaxed),
            self.total,
            self.started.elapsed(),
        )
    }
}

impl Progress {
    /// A bar on a terminal, log lines (tracing, level info) every [`LOG_EVERY`] otherwise.
    pub fn new(what: &str, total: u64) -> Self {
        if std::io::stderr().is_terminal() {
            Self::start(what, total, bar(what, total), None, LOG_EVERY)
        } else {
            let sink: Sink = Box::new(|line| tracing::info!("{line}"));
            Self::start(what, total, ProgressBar::hidden(), Some(sink), LOG_EVERY)
        }
    }

    /// No bar; every `every` a line to `sink` (what tests watch).
    pub fn with_sink(what: &str, total: u64, every: Duration, sink: Sink) -> Self {
        Self::start(what, total, ProgressBar::hidden(), Some(sink), every)
    }

    fn start(
        what: &str,
        total: u64,
        bar: ProgressBar,
        sink: Option<Sink>,
        every: Duration,
    ) -> Self {
        let shared = Arc::new(Shared {
            what: what.to_string(),
            total,
            done: AtomicU64::new(0),
            started: Instant::now(),
            stopped: Mutex::new(false),
            wake: Condvar::new(),
            sink,
        });
        if let Some(sink) = &shared.sink {
            sink(&format!("{what}: started, {total} to do"));
        }
        let ticker = shared.sink.is_some().then(|| {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name(format!("progress {what}"))
                .spawn(move || tick(&shared, every))
                .expect("a progress thread starts")
        });
        Self {
            bar,
            shared,
            ticker,
        }
    }

    pub fn inc(&self, n: u64) {
        self.shared.done.fetch_add(n, Ordering::Relaxed);
        self.bar.inc(n);
    }
}

fn tick(shared: &Shared, every: Duration) {
    let mut stopped = shared.stopped.lock().unwrap();
    loop {
        let (guard, wait) = shared.wake.wait_timeout(stopped, every).unwrap();
        stopped = guard;
        if *stopped {
            return;
        }
        if wait.timed_out() {
            if let Some(sink) = &shared.sink {
                sink(&format!("{}: {}", shared.what, shared.status()));
            }
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        *self.shared.stopped.lock().unwrap() = true;
        self.shared.wake.notify_all();
        if let Some(t) = self.ticker.take() {
            let _ = t.join();
        }
        self.bar.finish_and_clear();
        if let Some(sink) = &self.shared.sink {
            let s = self.shared.status();
            sink(&format!(
                "{}: {}/{} in {}",
                self.shared.what,
                s.done,
                s.total,
                human(s.elapsed)
            ));
        }
    }
}

fn bar(what: &str, total: u64) -> ProgressBar {
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template("{msg:>10} [{bar:40}] {pos}/{len} ({per_sec}, eta {eta})")
            .expect("static template")
            .progress_chars("=> "),
    );
    bar.set_message(what.to_string());
    bar
}

/// Where a step stands: what a progress line says.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Status {
    pub done: u64,
    pub total: u64,
    pub elapsed: Duration,
    /// Units per second so far (0 before the first unit).
    pub rate: f64,
    /// Time left at the rate so far; `None` until a unit is done.
    pub eta: Option<Duration>,
}

impl Status {
    pub fn at(done: u64, total: u64, elapsed: Duration) -> Self {
        let secs = elapsed.as_secs_f64();
        let rate = if secs > 0.0 { done as f64 / secs } else { 0.0 };
        let eta = (done > 0 && rate > 0.0)
            .then(|| Duration::from_secs_f64(total.saturating_sub(done) as f64 / rate));
        Self {
            done,
            total,
            elapsed,
            rate,
            eta,
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let pct = if self.total > 0 {
            100.0 * self.done as f64 / self.total as f64
        } else {
            100.0
        };
        write!(
            f,
            "{}/{} ({pct:.0} %), {:.1}/s, {} elapsed, ",
            self.done,
            self.total,
            self.rate,
            human(self.elapsed)
        )?;
        match self.eta {
            Some(eta) => write!(f, "about {} left", human(eta)),
            None => write!(f, "time left not known yet"),
        }
    }
}

/// "7 s", "3 min 05 s", "1 h 02 min".
pub fn human(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s} s"),
        60..3600 => format!("{} min {:02} s", s / 60, s % 60),
        _ => format!("{} h {:02} min", s / 3600, s % 3600 / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_gives_rate_and_time_left_at_the_rate_so_far() {
        let s = Status::at(300, 1200, Duration::from_secs(10));
        assert_eq!(s.rate, 30.0);
        assert_eq!(s.eta, Some(Duration::from_secs(30)));
        assert_eq!(
            s.to_string(),
            "300/1200 (25 %), 30.0/s, 10 s elapsed, about 30 s left"
        );
        let none = Status::at(0, 1200, Duration::from_secs(10));
        assert_eq!(none.eta, None);
        assert!(none.to_string().ends_with("time left not known yet"));
    }

    #[test]
    fn durations_read_as_people_write_them() {
        assert_eq!(human(Duration::from_secs(7)), "7 s");
        assert_eq!(human(Duration::from_secs(185)), "3 min 05 s");
        assert_eq!(human(Duration::from_secs(3720)), "1 h 02 min");
    }

    #[test]
    fn a_log_line_comes_every_interval_even_when_no_unit_finishes() {
        let lines = Arc::new(Mutex::new(Vec::<String>::new()));
        let sink = {
            let lines = lines.clone();
            Box::new(move |l: &str| lines.lock().unwrap().push(l.to_string()))
        };
        let p = Progress::with_sink("embedding", 10, Duration::from_millis(20), sink);
        p.inc(4);
        std::thread::sleep(Duration::from_millis(110));
        drop(p);
        let lines = lines.lock().unwrap();
        assert_eq!(lines[0], "embedding: started, 10 to do");
        let ticks = lines.iter().filter(|l| l.contains("4/10 (40 %)")).count();
        assert!(ticks >= 3, "expected a line every 20 ms: {lines:?}");
        assert!(
            lines.last().unwrap().starts_with("embedding: 4/10 in "),
            "{lines:?}"
        );
    }
}
