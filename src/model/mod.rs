//! Floor 1, the model: what a job is about, independent of any database or
//! process. Schema, keys and chunk ranges, filters, hashing, the pipeline
//! file and URLs, retry and cancellation, vector values. Imports nothing
//! from the crate's other floors.

/// `eprintln!` that cannot fail: a job whose stderr went away (a pipe whose
/// reader exited, a closed terminal) goes on with its work instead of
/// panicking on the next line it says. In scope for every floor above
/// (`#[macro_use]` in lib.rs), and as `vmig::say!` in the binary.
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

pub mod config;
pub mod filter;
pub mod hash;
pub mod plan;
pub mod retry;
pub mod schema;
pub mod vector;

pub fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// Milliseconds since the epoch as RFC 3339 (UTC, milliseconds).
pub fn rfc3339_of_ms(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

pub fn human_bytes(b: u64) -> String {
    match b {
        b if b >= 1 << 30 => format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64),
        b if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64),
        b if b >= 1 << 10 => format!("{:.1} KiB", b as f64 / 1024.0),
        b => format!("{b} B"),
    }
}
