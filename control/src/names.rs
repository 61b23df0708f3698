//! Queue and topic names every component agrees on.

/// The request firehose: ingresses publish, Trons consume.
pub const REQUESTS: &str = "funcatron.requests";
/// Messages no one could decode or route, with the reason in a header.
pub const DEAD_LETTERS: &str = "funcatron.dead";

/// The queue of one version of a Func: its Runners consume it, the Trons
/// route to the enabled version's queue.
pub fn func_queue(func: &str, version: &str) -> String {
    format!("funcatron.func.{func}.{version}")
}

/// An ingress instance's private reply queue.
pub fn reply_queue(instance: &str) -> String {
    format!("funcatron.reply.{instance}")
}

/// The broadcast topic of registry states and hellos ([`crate::state::Control`]).
pub const CONTROL_TOPIC: &str = "funcatron.control";
/// The broadcast topic Runners report their load on, every second
/// ([`crate::state::RunnerStats`]).
pub const STATS_TOPIC: &str = "funcatron.stats";
/// The broadcast topic Func log lines travel on.
pub const LOGS_TOPIC: &str = "funcatron.logs";
/// The broadcast topic captured pairs travel on (every Tron with a store
/// writes them).
pub const CAPTURE_TOPIC: &str = "funcatron.capture";
