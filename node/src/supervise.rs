//! The node's long-running tasks, supervised: each has a name, and a task
//! that fails, panics or returns before the node is shut down is reported
//! as an error naming it (the node then stops and says NOT_SERVING; see
//! `NodeHandle::stopped`).

use std::future::Future;
use std::panic::AssertUnwindSafe;

use anyhow::anyhow;
use futures::FutureExt;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// A set of named tasks.
pub(crate) struct Tasks {
    set: JoinSet<anyhow::Result<()>>,
    cancel: CancellationToken,
}

fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "no message".into())
}

impl Tasks {
    /// An empty set; `cancel` is the node's shutdown.
    pub(crate) fn new(cancel: CancellationToken) -> Self {
        Self {
            set: JoinSet::new(),
            cancel,
        }
    }

    /// Runs `task` as `name`.
    pub(crate) fn spawn(
        &mut self,
        name: &'static str,
        task: impl Future<Output = anyhow::Result<()>> + Send + 'static,
    ) {
        let cancel = self.cancel.clone();
        self.set.spawn(async move {
            match AssertUnwindSafe(task).catch_unwind().await {
                Ok(Ok(())) if cancel.is_cancelled() => Ok(()),
                Ok(Ok(())) => Err(anyhow!(
                    "the {name} task stopped before the node was shut down"
                )),
                Ok(Err(e)) => Err(e.context(format!("the {name} task failed"))),
                Err(p) => Err(anyhow!("the {name} task panicked: {}", panic_text(&*p))),
            }
        });
    }

    /// The next task to end, with its outcome; `None` when none is left.
    /// Cancel-safe.
    pub(crate) async fn next(&mut self) -> Option<anyhow::Result<()>> {
        self.set
            .join_next()
            .await
            .map(|r| r.map_err(|e| anyhow!("a task of the node could not be joined: {e}"))?)
    }
}
