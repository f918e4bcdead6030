use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Result;
use clap::Parser;

use vmig::commands::cli::Cli;
use vmig::commands;
use vmig::commands::job::EXIT_CANCELLED;
use vmig::model::config::{holds_url_password, redact_free_text};

fn main() -> ExitCode {
    // Without one process-wide provider, the first TLS connection to Milvus
    // (https://, tonic) panicked: rustls cannot choose between ring and aws-lc-rs.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = Cli::parse();
    if std::env::args().skip(1).any(|a| holds_url_password(&a)) {
        vmig::say!(
            "warning: a password is on the command line, where ps shows it to every user of this host and shell history keeps it; \
             pass env:NAME (or FastGPT's PG_URL, OCEANBASE_URL, MILVUS_ADDRESS), PGPASSWORD or ~/.pgpass instead"
        );
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            vmig::say!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let cancel = Arc::new(AtomicBool::new(false));
    {
        let cancel = cancel.clone();
        let _ = ctrlc::set_handler(move || {
            if cancel.swap(true, Ordering::SeqCst) {
                std::process::exit(EXIT_CANCELLED);
            }
            vmig::say!("\nstopping: in-flight chunks roll back, committed chunks stay (Ctrl+C again to quit now)");
        });
    }
    match run(cli, runtime.handle(), cancel.clone()) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            // One line, no stack, no secrets.
            vmig::say!("error: {}", redact_free_text(&format!("{e:#}")).replace('\n', " "));
            ExitCode::from(1)
        }
    }
}

fn run(cli: Cli, handle: &tokio::runtime::Handle, cancel: Arc<AtomicBool>) -> Result<u8> {
    commands::dispatch(cli, handle, cancel)
}
