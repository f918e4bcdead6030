//! Online migration: the snapshot copy (the offline pipeline), then the
//! source's changes applied continuously, then cutover. A source gives a
//! [`ChangeStream`]; every target applies [`ChangeSet`]s with the position
//! they cover in its ledger, in the same transaction where it has one.

pub mod apply;
pub mod cutover;
pub mod follow;
pub mod watch;

pub use follow::run_online;

/// What a cutover's check found (verify, or digests across a staging area).
#[derive(Default)]
pub struct CutoverCheck {
    pub equal: bool,
    /// Completes "safe to switch: …" when equal.
    pub summary: String,
    /// What differs, when not equal.
    pub differences: String,
    /// What differs is only copies the target kept of rows it acknowledged
    /// deleting (Milvus 2.3): stopping the writes does not help, a repair does.
    pub only_extra_copies: bool,
}

impl From<crate::engine::verify::VerifyReport> for CutoverCheck {
    fn from(r: crate::engine::verify::VerifyReport) -> Self {
        let diffs: Vec<String> = r
            .differing_chunks
            .iter()
            .take(3)
            .map(|d| d.describe())
            .collect();
        CutoverCheck {
            equal: r.equal,
            summary: format!(
                "the target equals the source ({} rows, ids and every column; vectors {})",
                r.target_rows, r.vector_comparison
            ),
            differences: format!("source {} rows, target {} rows; {}", r.source_rows, r.target_rows, diffs.join("; ")),
            only_extra_copies: crate::engine::verify::all_extra_copies(&r.differing_chunks),
        }
    }
}
