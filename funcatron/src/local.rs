//! The `process` substrate on the embedded broker: the embedded broker
//! lives inside one process, so Runners cannot be child processes there;
//! each Runner is a set of tasks inside `funcatron up`, started and
//! stopped (gracefully: consumer cancelled, in-flight work finished and
//! acknowledged) exactly as the autoscaler asks. They share one pool of
//! Lua threads and one direct listener ([`RunnerShared`]), so threads and
//! ports do not grow with the number of Funcs.

use funcatron_control::sync::poisoned;
use std::collections::HashMap;
use std::sync::Mutex;

use funcatron_broker::AnyBroker;
use funcatron_runner::follow::Desired;
use funcatron_runner::observe::LevelHook;
use funcatron_runner::{RunnerNode, RunnerOptions, RunnerShared};
use funcatron_tron::autoscale::{BoxFut, Observed, ScaleError, Substrate};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// What the Runner of `func` serves: its bundles (its versions) among
/// `all`, and the captures and log levels.
fn only(all: &Desired, func: &str) -> Desired {
    Desired {
        bundles: all
            .bundles
            .iter()
            .filter(|b| b.name == func)
            .cloned()
            .collect(),
        captures: all.captures.clone(),
        log_levels: all.log_levels.clone(),
    }
}

/// One in-process Runner: its stop signal and its task.
type Local = (CancellationToken, tokio::task::JoinHandle<()>);

/// Runners as tasks of this process.
pub struct LocalSubstrate {
    broker: AnyBroker,
    bundles: watch::Receiver<Desired>,
    options: RunnerOptions,
    levels: LevelHook,
    /// The Lua threads and direct listener all its Runners share.
    shared: RunnerShared,
    runners: Mutex<HashMap<String, Vec<Local>>>,
    stopping: TaskTracker,
}

impl LocalSubstrate {
    /// Runners serving, per Func, its bundles from `bundles`.
    pub fn new(
        broker: AnyBroker,
        bundles: watch::Receiver<Desired>,
        options: RunnerOptions,
        levels: LevelHook,
        shared: RunnerShared,
    ) -> Self {
        LocalSubstrate {
            broker,
            bundles,
            options,
            levels,
            shared,
            runners: Mutex::default(),
            stopping: TaskTracker::new(),
        }
    }

    fn start(&self, func: &str) -> Local {
        let stop = CancellationToken::new();
        let mut all = self.bundles.clone();
        let (tx, rx) = watch::channel(only(&all.borrow_and_update(), func));
        let node = RunnerNode::new(self.broker.clone())
            .options(self.options.clone())
            .log_levels(std::sync::Arc::clone(&self.levels))
            .shared(self.shared.clone())
            .desired(rx);
        let token = stop.clone();
        let func = func.to_owned();
        let task = tokio::spawn(async move {
            let follow = async {
                while all.changed().await.is_ok() {
                    tx.send_replace(only(&all.borrow_and_update(), &func));
                }
                std::future::pending::<()>().await;
            };
            tokio::select! {
                _ = node.run(token) => {}
                _ = follow => {}
            }
        });
        (stop, task)
    }
}

impl Substrate for LocalSubstrate {
    fn kind(&self) -> &'static str {
        "process"
    }

    fn observe<'a>(&'a self, func: &'a str) -> BoxFut<'a, Result<Observed, ScaleError>> {
        Box::pin(async move {
            let mut runners = self
                .runners
                .lock()
                .unwrap_or_else(|e| poisoned("local.runners", e));
            let list = runners.entry(func.to_owned()).or_default();
            list.retain(|(_, t)| !t.is_finished());
            let n = list.len() as u32;
            Ok(Observed {
                requested: n,
                running: n,
            })
        })
    }

    fn scale<'a>(&'a self, func: &'a str, n: u32) -> BoxFut<'a, Result<(), ScaleError>> {
        Box::pin(async move {
            let mut runners = self
                .runners
                .lock()
                .unwrap_or_else(|e| poisoned("local.runners", e));
            let list = runners.entry(func.to_owned()).or_default();
            while (list.len() as u32) < n {
                list.push(self.start(func));
                tracing::info!(func, "started an in-process Runner");
            }
            while (list.len() as u32) > n {
                if let Some((stop, task)) = list.pop() {
                    tracing::info!(func, "stopping an in-process Runner");
                    stop.cancel();
                    self.stopping.spawn(async move {
                        let _ = task.await;
                    });
                }
            }
            Ok(())
        })
    }

    fn shutdown(&self) -> BoxFut<'_, ()> {
        Box::pin(async move {
            let all: Vec<Local> = self
                .runners
                .lock()
                .map(|mut r| r.drain().flat_map(|(_, v)| v).collect())
                .unwrap_or_default();
            for (stop, task) in all {
                stop.cancel();
                let _ = task.await;
            }
            self.stopping.close();
            self.stopping.wait().await;
        })
    }
}
