//! The machine a report ran on, as the page states it: cores, CPU model and load average
//! from `/proc`, and the start time.

use serde::{Deserialize, Serialize};

/// The machine and the run, as the page states them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Machine {
    /// Cores available to the process (what `nproc` prints).
    pub nproc: usize,
    pub cpu: Option<String>,
    pub started_utc: String,
    /// `/proc/loadavg` (1, 5, 15 minutes) at the start and the end of the run.
    pub load_start: Option<String>,
    pub load_end: Option<String>,
    pub elapsed_s: f64,
}

pub(super) fn load_average() -> Option<String> {
    let s = std::fs::read_to_string("/proc/loadavg").ok()?;
    Some(s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
}

/// The end-of-run load average that shows other work beside the run, if any: the 5-minute
/// figure, or the 15-minute one for runs long enough to fill it, above the core count plus
/// half a core (the run itself keeps at most one runnable thread per core).
pub(super) fn overload(m: &Machine) -> Option<f64> {
    let loads: Vec<f64> = m
        .load_end
        .as_deref()?
        .split_whitespace()
        .map(|v| v.parse().ok())
        .collect::<Option<_>>()?;
    let mut load = *loads.get(1)?;
    if m.elapsed_s >= 15.0 * 60.0 {
        load = load.max(*loads.get(2)?);
    }
    (load > m.nproc as f64 + 0.5).then_some(load)
}

pub(super) fn cpu_model() -> Option<String> {
    let s = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    s.lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
}

/// `YYYY-MM-DD HH:MM UTC` of a Unix time (civil-from-days, no time zone database needed).
pub fn utc_date(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60
    )
}
