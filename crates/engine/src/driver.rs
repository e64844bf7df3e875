//! The commit driver: one loop for both engines.
//!
//! It takes every command waiting in the engine's channel (up to
//! [`GROUP`]) or wakes at the engine's next timer, then, **on a blocking
//! thread**, applies the commands one after another, lets the engine do
//! what is due ([`Engine::settle`]: timers, admission, scheduling), seals
//! the group into one batch and writes it synced. Back on the async
//! thread it hands the written group to [`Engine::written`] (answer the
//! senders, announce the messages, publish, start runs). Commands that
//! arrive during the write form the next group, so one sync is shared by
//! everything that arrived meanwhile, and no async thread waits on the
//! disk: storage reads of the engines happen inside `apply` and `settle`,
//! on the blocking thread too.
//!
//! A failed write answers the whole group "retry later" ([`Engine::failed`])
//! and reloads the engine from disk; while that reload fails the engine is
//! **stale**: every command is answered at once with the storage's error
//! (nobody waits on a disk) and the reload is tried again after a back-off
//! (100 ms doubling to 10 s), so a broken disk costs no spinning.

use std::time::Duration;

use caroni_store::{Batch, Store};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Most commands applied in one group.
pub const GROUP: usize = 1024;

/// What the driver needs of an engine. `apply`, `settle`, `seal` and
/// `reload` run on a blocking thread (they may read storage); `written`,
/// `failed` and `refuse` run on the async thread and must not block.
pub trait Engine: Send + Sized + 'static {
    /// A command from the engine's channel.
    type Cmd: Send + 'static;
    /// What one group changed and must perform once written.
    type Group: Default + Send + 'static;

    /// Applies one command to the state and the open group.
    fn apply(&mut self, cmd: Self::Cmd, g: &mut Self::Group);
    /// Does what is due after the group's commands: timers, admission,
    /// scheduling.
    fn settle(&mut self, g: &mut Self::Group);
    /// The batch that makes the group durable (records, staged messages,
    /// applied ids); empty when nothing is to be written.
    fn seal(&mut self, g: &mut Self::Group) -> Batch;
    /// The group is durable: answer, announce, publish, start.
    fn written(&mut self, g: Self::Group);
    /// The group's write failed (`why`): answer "retry later". The driver
    /// reloads the engine next.
    fn failed(&mut self, g: Self::Group, why: &str);
    /// Reads the state back from storage; an error leaves it stale.
    fn reload(&mut self) -> caroni_store::Result<()>;
    /// Answers a command without applying it: the engine is stale.
    fn refuse(&mut self, cmd: Self::Cmd, why: &str);
    /// When the next timer is due (ms since the epoch).
    fn next_timer(&self) -> Option<u64>;
    /// The driver stops: stop what runs.
    fn stop(&mut self) {}
}

/// How an engine waits after a failed write before it tries again: from
/// 100 ms, doubling, up to 10 s; back to nothing after a success.
#[derive(Debug, Default)]
pub struct Backoff {
    failures: u32,
}

impl Backoff {
    /// Records a write's outcome; how long to wait before the next try
    /// (zero after a success).
    pub fn delay(&mut self, ok: bool) -> Duration {
        if ok {
            self.failures = 0;
            return Duration::ZERO;
        }
        self.failures = self.failures.saturating_add(1);
        Duration::from_millis(100)
            .saturating_mul(1u32 << self.failures.min(7))
            .min(Duration::from_secs(10))
    }
}

/// What a group's trip to the blocking thread brought back.
struct Trip<E: Engine> {
    engine: E,
    group: E::Group,
    written: caroni_store::Result<()>,
    /// After a failed write: whether the reload worked.
    reloaded: caroni_store::Result<()>,
}

/// Applies `cmds` (and what is due), seals and writes, on the blocking
/// thread; reloads there after a failed write.
async fn trip<E: Engine>(mut engine: E, cmds: Vec<E::Cmd>, store: Store) -> Option<Trip<E>> {
    let task = tokio::task::spawn_blocking(move || {
        let mut g = E::Group::default();
        for c in cmds {
            engine.apply(c, &mut g);
        }
        engine.settle(&mut g);
        let batch = engine.seal(&mut g);
        let written = if batch.is_empty() {
            Ok(())
        } else {
            store.write(batch)
        };
        let reloaded = match &written {
            Ok(()) => Ok(()),
            Err(_) => engine.reload(),
        };
        Trip {
            engine,
            group: g,
            written,
            reloaded,
        }
    });
    match task.await {
        Ok(t) => Some(t),
        Err(e) => {
            // A panic in an engine is a bug; the engine's state went with
            // it. The node's health shows the engine stopped.
            tracing::error!(error = %e, "the engine's group task failed; the engine stops");
            None
        }
    }
}

/// Runs `engine` on the commands of `rx` until `cancel`.
pub async fn run<E: Engine>(
    engine: E,
    mut rx: mpsc::Receiver<E::Cmd>,
    store: Store,
    cancel: CancellationToken,
    what: &'static str,
) {
    let mut engine = engine;
    let mut backoff = Backoff::default();
    let mut stale: Option<String> = None;
    let mut cmds: Vec<E::Cmd> = Vec::new();
    // The first group holds no command: what is due at start (recovery,
    // admission, scheduling).
    let mut first = true;
    loop {
        if let Some(why) = stale.take() {
            // Answer at once meanwhile: nobody waits on a disk.
            let until = tokio::time::Instant::now() + backoff.delay(false);
            let why = format!(
                "the {what} cannot read its state from storage now ({}); it recovers by itself when storage works again, retry then",
                store.health().borrow().as_deref().unwrap_or(&why)
            );
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => {
                        engine.stop();
                        return;
                    }
                    _ = tokio::time::sleep_until(until) => break,
                    Some(cmd) = rx.recv() => engine.refuse(cmd, &why),
                }
            }
            let (e, reloaded) = {
                let mut e = engine;
                match tokio::task::spawn_blocking(move || {
                    let r = e.reload();
                    (e, r)
                })
                .await
                {
                    Ok(x) => x,
                    Err(err) => {
                        tracing::error!(error = %err, "the engine's reload task failed; the engine stops");
                        return;
                    }
                }
            };
            engine = e;
            if let Err(why) = reloaded {
                tracing::error!(error = %why, "cannot reload the {what}'s state; will try again");
                stale = Some(why.to_string());
                continue;
            }
        }
        if std::mem::take(&mut first) {
            // Nothing to wait for.
        } else {
            let sleep = match engine.next_timer() {
                Some(at) => Duration::from_millis(at.saturating_sub(caroni_types::now_ms())),
                None => Duration::from_secs(3600),
            };
            tokio::select! {
                biased;
                _ = cancel.cancelled() => break,
                cmd = rx.recv() => match cmd {
                    Some(cmd) => {
                        cmds.push(cmd);
                        while cmds.len() < GROUP {
                            match rx.try_recv() {
                                Ok(cmd) => cmds.push(cmd),
                                Err(_) => break,
                            }
                        }
                    }
                    None => break,
                },
                _ = tokio::time::sleep(sleep) => {}
            }
        }
        let Some(t) = trip(engine, std::mem::take(&mut cmds), store.clone()).await else {
            return;
        };
        engine = t.engine;
        let ok = t.written.is_ok();
        match t.written {
            Ok(()) => engine.written(t.group),
            Err(e) => {
                let e = format!("cannot write the {what}'s state: {e}");
                tracing::error!(error = %e, "group not written; reloading from disk");
                engine.failed(t.group, &e);
                if let Err(why) = t.reloaded {
                    tracing::error!(error = %why, "cannot reload the {what}'s state; will try again");
                    stale = Some(why.to_string());
                    continue;
                }
            }
        }
        // Storage fails: wait before the next try instead of spinning on
        // the same due timers.
        let wait = backoff.delay(ok);
        if !wait.is_zero() {
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = cancel.cancelled() => break,
            }
        }
    }
    engine.stop();
}
