//! Queue names every component agrees on.

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

/// Header on a dead-lettered message: why it was dead-lettered.
pub const DEAD_REASON: &str = "x-funcatron-dead-reason";
/// Header on a dead-lettered message: the queue it came from.
pub const DEAD_SOURCE: &str = "x-funcatron-dead-source";
