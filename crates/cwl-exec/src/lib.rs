//! Running CWL v1.2 processes: reading documents (`load`), values and
//! types (`types`, `files`), expressions (`expr`: parameter references and
//! JavaScript in an embedded QuickJS with time and memory limits), command
//! lines (`cmdline`) and running a CommandLineTool or ExpressionTool on
//! this host (`run`).
//!
//! The agent runs tools with it; the manager evaluates ExpressionTools with
//! it. It knows nothing of the mesh: inputs are File objects that name
//! places on this host, and so are the outputs.

pub mod cmdline;
pub mod expr;
pub mod files;
pub mod load;
pub mod run;
pub mod types;

pub use load::{load, LoadError, Loaded};
pub use run::{run, Job, Options, ToolError};
