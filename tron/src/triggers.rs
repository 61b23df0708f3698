//! Event triggers on a Tron: the document store's change events delivered
//! to the operations that declared a `store` trigger.
//!
//! a document write (ingress, Tron, a Func through its Runner) -> the
//! outbox, in the same commit -> **the relay (here, on the one Tron that
//! holds the `documents-relay` lease)** -> one asynchronous call per
//! subscribed trigger on `funcatron.requests` -> a Tron routes it to the
//! Func's async queue -> Runner -> `funcatron.outcomes` -> retries, dead
//! letters as the Func's async policy says.
//!
//! A triggered call is a normal request envelope: `POST` to the
//! operation's path on the Func's primary base, the event as its JSON
//! body, `X-Funcatron-Trigger: <name>` and `X-Funcatron-Event-Id`. Its
//! idempotency key is the trigger and the event id, so an event relayed
//! twice (a relay killed after it queued the call and before it removed the
//! event) is still one call. The relay removes an event from the outbox
//! only after every call it makes is recorded and queued; a failure stops
//! the pass there, so a document's events are queued in commit order.
//!
//! The relay wakes on every change committed through this process, on
//! every change another process announces on `funcatron.documents`
//! ([`announce`]: other Trons on a shared PostgreSQL store, a standalone
//! ingress), and polls every [`RELAY_POLL`] for what it was not told.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use funcatron_broker::{AnyBroker, Broker as _, Message};
use funcatron_bundle::triggers::{QueueTrigger, Schedule, StoreEvent, TriggerKind, TRIGGER_HEADER};
use funcatron_bundle::Bundle;
use funcatron_calls::submit::{first_attempt, queue, Async, Queued, Refused};
use funcatron_calls::Calls;
use funcatron_control::names;
use funcatron_documents::{Documents, Event};
use funcatron_envelope::{new_request_id, Request, VERSION};
use funcatron_store::lease::Lease;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

/// The header carrying a triggered call's event id.
pub const EVENT_ID_HEADER: &str = "x-funcatron-event-id";

/// The lease the document relay runs under.
pub const RELAY_LEASE: &str = "documents-relay";

/// How long a relay's lease lasts without renewal.
const LEASE_TTL: Duration = Duration::from_secs(10);

/// How often the relay looks for changes it was not told of (a change
/// announcement is a broadcast: not kept for a relay that was not
/// listening).
pub const RELAY_POLL: Duration = Duration::from_millis(250);

/// Outbox events read per page.
const PAGE: usize = 100;

/// Where a trigger's calls go.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Target {
    /// The Func.
    pub func: String,
    /// The trigger's name.
    pub trigger: String,
    /// The host of the Func's primary base (`localhost` for any host).
    pub host: String,
    /// The operation's full path (base path and template).
    pub path: String,
}

/// Every trigger of the served bundles, by what fires it.
#[derive(Debug, Clone, Default)]
pub struct TriggerSet {
    /// Collection -> (which changes, where they go).
    store: HashMap<String, Vec<(Vec<StoreEvent>, Target)>>,
    /// Cron schedules and where their ticks go.
    schedules: Vec<(Schedule, Target)>,
    /// Queue and exchange triggers and where their messages go.
    queues: Vec<(QueueTrigger, Target)>,
}

fn join(base: &str, path: &str) -> String {
    match base.trim_end_matches('/') {
        "" => path.to_owned(),
        b => format!("{b}{path}"),
    }
}

impl TriggerSet {
    /// The triggers of `bundles`.
    pub fn of(bundles: &[Bundle]) -> Self {
        let mut set = TriggerSet::default();
        for b in bundles {
            for op in &b.operations {
                let base = op.bases_in(&b.bases).first();
                for t in &op.triggers {
                    let target = Target {
                        func: b.name.clone(),
                        trigger: t.name.clone(),
                        host: base
                            .and_then(|x| x.host.clone())
                            .or_else(|| b.host.clone())
                            .unwrap_or_else(|| "localhost".into()),
                        path: join(
                            base.map_or(b.base_path.as_str(), |x| x.path.as_str()),
                            &op.path,
                        ),
                    };
                    match &t.kind {
                        TriggerKind::Store(s) => set
                            .store
                            .entry(s.collection.clone())
                            .or_default()
                            .push((s.events.clone(), target)),
                        TriggerKind::Schedule(s) => set.schedules.push((s.clone(), target)),
                        TriggerKind::Queue(q) => set.queues.push((q.clone(), target)),
                    }
                }
            }
        }
        set
    }

    /// Where an event goes.
    pub fn for_event<'a>(&'a self, e: &'a Event) -> impl Iterator<Item = &'a Target> {
        self.store
            .get(&e.collection)
            .into_iter()
            .flatten()
            .filter(|(events, _)| events.iter().any(|k| k.as_str() == e.kind.as_str()))
            .map(|(_, t)| t)
    }

    /// The schedules and where their ticks go.
    pub fn schedules(&self) -> &[(Schedule, Target)] {
        &self.schedules
    }

    /// The queue and exchange triggers and where their messages go.
    pub fn queues(&self) -> &[(QueueTrigger, Target)] {
        &self.queues
    }
}

/// Keep `out` up to date with the triggers of what `served` serves, and
/// define the collections its bundles bring (`collections`) that the store
/// does not have yet, until `shutdown`.
pub async fn follow(
    mut served: watch::Receiver<Arc<crate::registry::Served>>,
    docs: Option<Documents>,
    out: watch::Sender<Arc<TriggerSet>>,
    shutdown: CancellationToken,
) {
    loop {
        let now = Arc::clone(&served.borrow_and_update());
        if let Some(docs) = &docs {
            define_collections(docs, &now.bundles).await;
        }
        out.send_replace(Arc::new(TriggerSet::of(&now.bundles)));
        tokio::select! {
            () = shutdown.cancelled() => return,
            r = served.changed() => if r.is_err() { return },
        }
    }
}

/// Define each collection a bundle declares that is not defined yet (an
/// existing definition is the operator's: left alone).
pub async fn define_collections(docs: &Documents, bundles: &[Bundle]) {
    for b in bundles {
        for (name, def) in &b.collections {
            match docs.collection(name).await {
                Err(funcatron_documents::DocError::UnknownCollection(_)) => {}
                _ => continue,
            }
            let outcome = match serde_json::from_value(def.clone()) {
                Ok(definition) => docs.define(name, definition).await.map(drop),
                Err(e) => Err(funcatron_documents::DocError::Invalid(e.to_string())),
            };
            match outcome {
                Ok(()) => {
                    tracing::info!(func = %b.name, collection = %name, "collection defined by its bundle")
                }
                Err(e) => {
                    tracing::warn!(func = %b.name, collection = %name, error = %e, "the bundle's collection was not defined")
                }
            }
        }
    }
}

/// Queue one triggered call of `target` with `body` (JSON), once per
/// `event_id` (its idempotency key is the trigger and the event id);
/// returns the call's id and whether it is new (else the earlier call of
/// that event id).
pub async fn submit(
    calls: &Calls,
    broker: &AnyBroker,
    target: &Target,
    body: &str,
    event_id: &str,
) -> Result<(String, bool), Refused> {
    let id = new_request_id();
    // The trigger in the id: its outcome is counted per trigger
    // (`trigger_calls_total`, see `funcatron_calls::trigger_of`).
    let call_id = format!("c{}:{}", new_request_id(), target.trigger);
    let secret = new_request_id();
    let base = Request {
        version: VERSION.into(),
        id: id.into(),
        method: "POST".into(),
        scheme: "http".into(),
        host: target.host.as_str().into(),
        path: target.path.as_str().into(),
        headers: vec![
            ("content-type".into(), "application/json".into()),
            (TRIGGER_HEADER.into(), target.trigger.as_str().into()),
            (EVENT_ID_HEADER.into(), event_id.into()),
        ],
        body: body.into(),
        ..Request::default()
    };
    let request = first_attempt(base, &call_id, None, Async::Recorded);
    let key = format!("trigger {} {} {event_id}", target.func, target.trigger);
    match queue(Some(calls), broker, &request, &secret, Some(&key), None).await? {
        Queued::New => {
            metrics::counter!("trigger_fired_total", "func" => target.func.clone(), "trigger" => target.trigger.clone())
                .increment(1);
            Ok((call_id, true))
        }
        Queued::Existing(first) => Ok((first, false)),
    }
}

/// Tell other processes' relays of every change committed through `docs`
/// (on [`names::DOCUMENTS_TOPIC`], `origin` as the body), until
/// `shutdown`. Changes committed while a broadcast is in flight are told
/// in the next one.
pub async fn announce(
    docs: Documents,
    broker: AnyBroker,
    origin: String,
    shutdown: CancellationToken,
) {
    let mut writes = docs.writes();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            r = writes.changed() => if r.is_err() { return },
        }
        writes.borrow_and_update();
        let told = broker
            .broadcast(names::DOCUMENTS_TOPIC, Message::new(origin.clone()))
            .await;
        if let Err(e) = told {
            tracing::debug!(error = %e, "a document change was not announced; relays find it at their next poll");
        }
    }
}

/// Relay the document outbox until `shutdown` (see the module): on this
/// Tron while it holds the lease, as `holder`, looking every `poll` for
/// changes it was not told of.
pub async fn relay(
    docs: Documents,
    calls: Calls,
    broker: AnyBroker,
    mut triggers: watch::Receiver<Arc<TriggerSet>>,
    holder: String,
    poll: Duration,
    shutdown: CancellationToken,
) {
    let changed = docs.changed();
    // Other processes' changes; without it, the poll finds them.
    let mut told = match broker.subscribe(names::DOCUMENTS_TOPIC).await {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "not told of other processes' document changes; polling");
            None
        }
    };
    // Not before the served triggers are known: a pass with none would
    // remove every waiting event as unsubscribed.
    tokio::select! {
        () = shutdown.cancelled() => return,
        r = triggers.changed() => if r.is_err() {
            tracing::warn!("the document relay never got the served triggers");
            return;
        },
    }
    let mut lease = Lease::new(docs.store().clone(), RELAY_LEASE, holder.clone(), LEASE_TTL);
    let mut poll = tokio::time::interval(poll);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Announcements are for the lease holder; the others take the lease
    // over at a poll, not at every write in the cluster.
    let mut holding = false;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => {
                if let Err(e) = lease.release().await {
                    tracing::debug!(error = %e, "the relay lease was not released");
                }
                return;
            }
            () = changed.notified() => {}
            _ = poll.tick() => {}
            m = next_told(&mut told) => match m {
                // Its own announcement: `changed` woke it already.
                Some(m) if m.payload == holder.as_bytes() || !holding => continue,
                Some(_) => {}
                None => told = None,
            },
        }
        let held = lease.hold().await;
        holding = matches!(held, Ok(true));
        match held {
            Ok(true) => {}
            Ok(false) => continue,
            Err(e) => {
                tracing::warn!(error = %e, "the document relay cannot reach its lease");
                continue;
            }
        }
        let set = Arc::clone(&triggers.borrow());
        if let Err(e) = drain(&docs, &calls, &broker, &set).await {
            metrics::counter!("trigger_relay_failures_total").increment(1);
            tracing::warn!(error = %e, "relaying document events stopped; trying again");
        }
    }
}

/// The next announcement, or never without a subscription.
async fn next_told(told: &mut Option<funcatron_broker::Subscription>) -> Option<Message> {
    match told {
        Some(s) => s.next().await.map(|d| d.message.clone()),
        None => std::future::pending().await,
    }
}

/// One pass over the outbox: every waiting event handed to its triggers,
/// then removed.
async fn drain(
    docs: &Documents,
    calls: &Calls,
    broker: &AnyBroker,
    set: &TriggerSet,
) -> Result<(), String> {
    let mut after: Option<String> = None;
    loop {
        let page = docs
            .pending(after.as_deref(), PAGE)
            .await
            .map_err(|e| e.to_string())?;
        let mut done: Vec<&str> = Vec::with_capacity(page.len());
        let mut failed = None;
        let mut fired: HashMap<&Target, u64> = HashMap::new();
        for p in &page {
            match &p.event {
                Err(why) => {
                    tracing::warn!(key = %p.key, why, "an unreadable outbox record; dropped")
                }
                Ok(event) => {
                    if let Err(e) = deliver(calls, broker, set, event).await {
                        failed = Some(e);
                        break;
                    }
                    for t in set.for_event(event) {
                        *fired.entry(t).or_default() += 1;
                    }
                }
            }
            done.push(&p.key);
        }
        docs.delivered(&done).await.map_err(|e| e.to_string())?;
        let now = funcatron_store::now_ms();
        for (target, n) in fired {
            if let Err(e) = crate::schedules::count_firings(docs.store(), target, n, now).await {
                tracing::debug!(error = %e, "a trigger's firings were not counted");
            }
        }
        if let Some(e) = failed {
            return Err(e);
        }
        if page.len() < PAGE {
            return Ok(());
        }
        after = page.last().map(|p| p.key.clone());
    }
}

/// Queue the calls of one event.
async fn deliver(
    calls: &Calls,
    broker: &AnyBroker,
    set: &TriggerSet,
    event: &Event,
) -> Result<(), String> {
    let mut body = None;
    for target in set.for_event(event) {
        let json = match &body {
            Some(b) => b,
            None => body.insert(serde_json::to_string(event).map_err(|e| e.to_string())?),
        };
        let span = tracing::debug_span!("trigger", func = %target.func, trigger = %target.trigger, event_id = %event.event_id);
        submit(calls, broker, target, json, &event.event_id)
            .instrument(span)
            .await
            .map_err(|e| format!("trigger {} of {}: {e}", target.trigger, target.func))?;
        let lag = funcatron_store::now_ms().saturating_sub(event.at_ms) as f64 / 1000.0;
        metrics::histogram!("trigger_lag_seconds", "func" => target.func.clone(), "trigger" => target.trigger.clone())
            .record(lag);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_join_base_and_template() {
        assert_eq!(join("/", "/tick"), "/tick");
        assert_eq!(join("/api", "/tick"), "/api/tick");
        assert_eq!(join("/api/", "/tick"), "/api/tick");
    }
}
