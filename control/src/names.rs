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

/// The asynchronous calls of one version of a Func: consumed by its
/// Runners beside [`func_queue`], with their own concurrency, so a backlog
/// of async calls never delays a synchronous request.
pub fn func_async_queue(func: &str, version: &str) -> String {
    format!("funcatron.async.{func}.{version}")
}

/// Where Runners publish the outcomes of asynchronous calls; Trons consume
/// it, record each outcome, deliver callbacks and schedule retries.
pub const OUTCOMES: &str = "funcatron.outcomes";

/// Pipelines reaching their first `mode: async` step during a synchronous
/// request (`docs/flows.md`): every Tron consumes it; one with a state
/// store records the call, queues the step and answers the caller 202,
/// one without answers 501 `async_unavailable`.
pub const FLOW_PHASES: &str = "funcatron.flow-phases";

/// Callback deliveries waiting to be made (a job per call: its id and
/// which delivery); Trons with a state store consume it, and a failed
/// delivery comes back through a delay queue.
pub const CALLBACKS: &str = "funcatron.callbacks";

/// The queue a message waits in for `delay_ms` before the broker moves it
/// to `target` (RabbitMQ: a queue-level TTL dead-lettering into `target`;
/// one queue per distinct delay, so a long delay never holds up a short
/// one).
pub fn delay_queue(target: &str, delay_ms: u64) -> String {
    format!("funcatron.delay.{delay_ms}.{target}")
}

/// The queue an exchange trigger binds to its exchange (durable, shared
/// by every Tron, so each message is consumed once).
pub fn trigger_queue(func: &str, trigger: &str) -> String {
    format!("funcatron.trigger.{func}.{trigger}")
}

/// Document store requests of Funcs, from their Runners: Trons with a
/// document store consume it and answer on the Runner's reply queue.
pub const STORE_REQUESTS: &str = "funcatron.store";

/// An ingress instance's private reply queue.
pub fn reply_queue(instance: &str) -> String {
    format!("funcatron.reply.{instance}")
}

/// The broadcast topic of document-store changes: a process that
/// committed one says so (its origin as the body), so the relay of
/// another process wakes at once instead of at its next poll.
pub const DOCUMENTS_TOPIC: &str = "funcatron.documents";

/// The broadcast topic of registry states and hellos ([`crate::state::Control`]).
pub const CONTROL_TOPIC: &str = "funcatron.control";
/// The broadcast topic Runners report their load on, every second
/// ([`crate::state::RunnerStats`]).
pub const STATS_TOPIC: &str = "funcatron.stats";
/// The broadcast topic of the Trons' admission tables
/// ([`crate::admission::AdmissionTable`]): Trons send, ingresses hear.
/// Apart from [`CONTROL_TOPIC`], so Runners and Trons, which have no use
/// for it, never decode it.
pub const ADMISSION_TOPIC: &str = "funcatron.admission";
/// The broadcast topic ingresses report the requests they routed at the
/// edge on ([`crate::admission::EdgeDemand`]): ingresses send, Trons hear.
pub const DEMAND_TOPIC: &str = "funcatron.demand";
/// The broadcast topic Func log lines travel on.
pub const LOGS_TOPIC: &str = "funcatron.logs";
/// The broadcast topic captured pairs travel on (every Tron with a store
/// writes them).
pub const CAPTURE_TOPIC: &str = "funcatron.capture";

/// Path prefixes Funcatron serves itself on every host (the ingress's
/// `/_funcatron/health` and `/_funcatron/metrics`, the dev server's
/// `/_funcatron/dev/`, and whatever it adds later under them). No Func may
/// claim a path under one: the bundle is refused.
pub const RESERVED_PREFIXES: &[&str] = &["/_funcatron"];

/// The reserved prefix `path` falls under, if any (`/_funcatron` itself or
/// anything below it; a prefix only counts at a `/` boundary).
pub fn reserved_prefix(path: &str) -> Option<&'static str> {
    RESERVED_PREFIXES.iter().copied().find(|p| {
        path.strip_prefix(p)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
    })
}

#[cfg(test)]
mod tests {
    use super::reserved_prefix;

    #[test]
    fn reserved_prefixes_count_at_path_boundaries() {
        assert_eq!(reserved_prefix("/_funcatron"), Some("/_funcatron"));
        assert_eq!(reserved_prefix("/_funcatron/health"), Some("/_funcatron"));
        assert_eq!(reserved_prefix("/_funcatronic"), None);
        assert_eq!(reserved_prefix("/api/_funcatron"), None);
    }
}
