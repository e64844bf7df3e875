//! What both engines (manager and agent) share and nothing else: the port
//! they send through ([`Wire`]), and the commit driver ([`driver`]) that
//! gathers their commands into groups, applies and writes each group in
//! one synced batch on a blocking thread, and only then performs what the
//! group produced.
//!
//! The rules themselves live in each engine's machine (`caroni_manager::
//! engine`, `caroni_agent::engine`); this crate knows no message but what
//! the port carries. It must not depend on libp2p or tonic.

pub mod driver;
mod port;

pub use driver::{Backoff, Engine, GROUP};
pub use port::{StageError, Staged, Wire};
