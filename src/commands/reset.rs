//! `vmig reset`: forgets a job (state, ledger records, source artefacts).

use std::io::{BufRead, Write};
use std::path::Path;

use anyhow::{Context, Result, bail};
use tokio::runtime::Handle;

use crate::backends::open_sink;
use crate::commands::cli::ResetArgs;
use crate::commands::job::{DEFAULT_TABLE, job_store_of, state_root};
use crate::model::config::Endpoint;
use crate::state::ledger::JobDir;
use crate::state::manifest::Manifest;

pub fn reset(a: ResetArgs, handle: &Handle) -> Result<()> {
    let store = job_store_of(&a.staging, &a.job, &a.state_root)?;
    let job = match (&a.job, Manifest::load(&store)?) {
        (Some(j), _) => j.clone(),
        (None, Some(m)) => m.job,
        (None, None) => bail!("no job in {}", store.describe()),
    };
    let dir = store.local_dir().map(Path::to_path_buf).unwrap_or_else(|| state_root(&a.state_root).join(&job));
    let target = a.to.as_deref().map(Endpoint::parse).transpose()?;
    if !a.yes {
        say!("This forgets job {job}: removes {} (manifest, chunks, change files, claims, status, rejects)", store.describe());
        if let Some(t) = &target {
            say!("and its ledger rows in {} (rows already copied stay).", t.describe());
        }
        if let Some(st) = crate::state::online::OnlineState::load(&dir)? {
            say!("It drops replication slot {} and publication {} on {}.", st.slot, st.publication, st.source);
        }
        eprint!("Proceed? [y/N] ");
        std::io::stderr().flush()?;
        let mut line = String::new();
        std::io::stdin().lock().read_line(&mut line)?;
        if !matches!(line.trim(), "y" | "Y" | "yes") {
            bail!("reset aborted");
        }
    }
    crate::commands::online::reset_artifacts(&dir, a.from.as_deref(), handle)?;
    if let Some(t) = &target {
        // The ledger is per database, not per table.
        let n = open_sink(t, DEFAULT_TABLE, handle, Some(&store))?.forget_job(&job)?;
        say!("deleted {n} ledger rows of job {job}");
    }
    // A shared job's claims and worker status, and a remote store's objects.
    for prefix in ["work", "ledger", "chunks", "rejects"] {
        if store.is_remote() || prefix == "work" {
            store.delete_prefix(prefix)?;
        }
    }
    if store.is_remote() {
        store.delete("manifest.json")?;
    }
    let jd = JobDir::new(&dir);
    for p in [jd.chunks(), jd.rejects(), crate::backends::staging::changes::changes_dir(&dir)] {
        if p.exists() {
            std::fs::remove_dir_all(&p).with_context(|| format!("removing {}", p.display()))?;
        }
    }
    let mut files = vec![jd.manifest()];
    for command in ["export", "import", "migrate"] {
        files.extend([jd.status(command), crate::state::online::CutoverRequest::path(&dir, command)]);
        let watch = crate::engine::online::watch::watch_dir(&dir, command);
        crate::engine::online::watch::discard(&watch)?;
        if watch != dir {
            let _ = std::fs::remove_dir(&watch); // only if now empty
        }
    }
    for p in files {
        if p.exists() {
            std::fs::remove_file(&p)?;
        }
    }
    let _ = std::fs::remove_dir(&dir); // only if now empty
    say!("job {job} reset");
    Ok(())
}
