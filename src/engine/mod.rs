//! Floor 5, the engine: what moves and checks rows, whatever the backends.
//! The offline pipeline (plan, load, finish; shared jobs), online follow and
//! cutover, transform (validation, casts, rejects), verify, repair, recall.

pub mod online;
pub mod pipeline;
pub mod recall;
pub mod repair;
pub mod transform;
pub mod verify;
