//! Riding out a database that restarts or drops a connection mid-run:
//! retries with backoff for a bounded time, and the errors that call for it.

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::{Duration, Instant};

use anyhow::Result;


/// Retries `f` while it fails with errors that a restarting server or a
/// dropped connection explain, with backoff, for at most `retry_for`; any
/// other error is retried `quick` times. Says what it does.
pub fn with_retries<T>(
    what: &str,
    retry_for: Duration,
    quick: u32,
    cancel: &AtomicBool,
    say: &dyn Fn(&str),
    mut f: impl FnMut() -> Result<T>,
) -> Result<T> {
    let started = Instant::now();
    let mut attempt = 0u32;
    loop {
        match f() {
            Ok(v) => return Ok(v),
            Err(e) if e.is::<Cancelled>() || cancel.load(Relaxed) => return Err(e),
            Err(e) => {
                attempt += 1;
                let transient = is_transient(&e);
                let delay = Duration::from_millis(500u64 << attempt.min(5)).min(Duration::from_secs(10));
                let in_time = started.elapsed() + delay <= retry_for;
                if (transient && in_time) || (!transient && attempt <= quick) {
                    say(&format!(
                        "{what}: {e:#}; retrying in {:.1}s ({})",
                        delay.as_secs_f64(),
                        if transient {
                            format!("server unavailable for {:.0}s of at most {:.0}s", started.elapsed().as_secs_f64(), retry_for.as_secs_f64())
                        } else {
                            format!("{attempt}/{quick}")
                        }
                    ));
                    std::thread::sleep(delay);
                    continue;
                }
                if transient {
                    return Err(e.context(format!(
                        "the server stayed unavailable for {:.0}s (--retry-for); run the same command again to resume",
                        started.elapsed().as_secs_f64()
                    )));
                }
                return Err(e);
            }
        }
    }
}

/// Errors a server restart or a broken connection cause (as opposed to
/// errors in the data or the schema, which a retry cannot fix).
pub fn is_transient(e: &anyhow::Error) -> bool {
    let text = format!("{e:#}").to_lowercase();
    [
        "connection refused",
        "connection reset",
        "connection closed",
        "connection aborted",
        "broken pipe",
        "unexpected eof",
        "cannot connect",
        "shutting down",
        "terminating connection",
        "the database system is starting up",
        "the database system is in recovery mode",
        "server closed the connection",
        "connection to server",
        "error communicating with the server",
        "io error",
        "transport error",
        "status: unavailable",
        "code: unavailable",
        "service unavailable",
        "not ready",
        "server is initializing",
        "timed out",
        "deadline has elapsed",
        "os error 104",
        "os error 111",
        "os error 32",
        "lost connection",
        "gone away",
        "driver error: \"connection",
        "server is not serving",
        "tcp connect error",
        // Milvus just after a restart, while its nodes re-register.
        "node not found",
        "node not match",
        "session not found",
        "channel not found",
        "operation was canceled",
        "(cancelled)",
        "timeout expired",
        "(unavailable)",
        "not healthy",
        "is initializing",
        "stopping",
    ]
    .iter()
    .any(|p| text.contains(p))
}


#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restarts_are_transient_and_data_errors_are_not() {
        for m in [
            "writing chunk 2: connection closed",
            "cannot connect to postgresql://u@h:1/db: Connection refused (os error 111)",
            "chunk 3: db error: FATAL: terminating connection due to administrator command",
            "upsert of 200 rows into modeldata on milvus://h:19530/fastgpt: tcp connect error (Unavailable)",
            "flushing modeldata: rpc error: node not match[expectedNodeID=1][actualNodeID=2] (Milvus code 65535)",
        ] {
            assert!(is_transient(&anyhow::anyhow!("{m}")), "{m}");
        }
        for m in ["decoding chunk 4: vector has 3 dimensions, not 4", "permission denied to create extension \"vector\""] {
            assert!(!is_transient(&anyhow::anyhow!("{m}")), "{m}");
        }
    }

    #[test]
    fn permanent_errors_get_quick_retries_then_fail() {
        let calls = std::cell::Cell::new(0);
        let r: Result<()> = with_retries("x", Duration::from_secs(60), 1, &AtomicBool::new(false), &|_| {}, || {
            calls.set(calls.get() + 1);
            anyhow::bail!("bad row")
        });
        assert!(r.is_err());
        assert_eq!(calls.get(), 2, "one try and one quick retry");
    }
}

#[derive(Debug, thiserror::Error)]
#[error("cancelled")]
pub struct Cancelled;
