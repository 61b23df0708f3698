//! Event triggers an operation declares (`x-funcatron-triggers`): what
//! besides an HTTP request invokes it.
//!
//! The bundle loader reads and checks them here (a bad cron expression,
//! an unknown time zone or a malformed entry is refused with its place in
//! the document); the Tron runs them: the scheduler fires schedules, the
//! queue consumer takes messages, the document store's relay delivers
//! change events. Every firing is a normal asynchronous call of the
//! operation: `POST <base path><path>`, the event as its JSON body, the
//! header `X-Funcatron-Trigger: <name>`, with the Func's async policy
//! (retries, dead letters, redrive). See `docs/triggers.md`.
//!
//! ```yaml
//! paths:
//!   /tick:
//!     post:
//!       operationId: tick
//!       x-funcatron-triggers:
//!         - name: nightly
//!           schedule: {cron: "0 30 3 * * *", timezone: Europe/Paris, catch_up: latest}
//!         - name: orders-in
//!           queue: {queue: orders, batch: 10, concurrency: 2}
//!         - name: new-orders
//!           store: {collection: orders, events: [created]}
//! ```

use std::str::FromStr;

use croner::parser::{CronParser, Seconds, Year};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The operation extension listing its triggers.
pub const TRIGGERS_EXTENSION: &str = "x-funcatron-triggers";

/// The header naming the trigger of a triggered call.
pub const TRIGGER_HEADER: &str = "x-funcatron-trigger";

/// Most triggers one operation declares.
pub const MAX_TRIGGERS: usize = 16;

/// Most messages a queue trigger hands one call.
pub const MAX_BATCH: usize = 100;

/// Most calls a queue trigger has running at once.
pub const MAX_CONCURRENCY: usize = 64;

/// The longest a queue trigger's batch waits to fill, ms.
pub const MAX_BATCH_WINDOW_MS: u64 = 10_000;

/// Most missed ticks `catch_up: all` fires after an outage.
pub const MAX_CATCH_UP: usize = 100;

/// One trigger of an operation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Trigger {
    /// Unique in the bundle: names it in the header, in metrics and in
    /// `funcatron func show`.
    pub name: String,
    /// What fires it.
    #[serde(flatten)]
    pub kind: TriggerKind,
}

/// What fires a trigger.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TriggerKind {
    /// A cron schedule.
    Schedule(Schedule),
    /// Messages on a queue, or bound from an exchange.
    Queue(QueueTrigger),
    /// Changes of documents in a collection of the document store.
    Store(StoreTrigger),
}

/// What is fired for the ticks missed while no Tron ran.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CatchUp {
    /// Nothing: the schedule goes on from the next tick.
    Skip,
    /// One firing, for the latest missed tick (the default).
    #[default]
    Latest,
    /// Every missed tick, oldest first, at most [`MAX_CATCH_UP`].
    All,
}

/// A cron schedule: 5 fields (minute to weekday) or 6 (seconds first),
/// in a time zone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Schedule {
    /// The expression (`*/5 * * * *`, `0 30 3 * * MON-FRI`).
    pub cron: String,
    /// An IANA time zone (`Europe/Paris`); default `UTC`.
    #[serde(default = "utc")]
    pub timezone: String,
    /// What a Tron starting after an outage fires for missed ticks.
    #[serde(default)]
    pub catch_up: CatchUp,
}

fn utc() -> String {
    "UTC".into()
}

/// Messages of an AMQP queue the Func does not own, or of an exchange.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueTrigger {
    /// A queue to consume (it must exist on the broker).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<String>,
    /// An exchange to bind a queue of the trigger's own to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exchange: Option<String>,
    /// The binding key for `exchange` (default `#`: everything).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub binding_key: Option<String>,
    /// Messages per call (default 1): the body is one message's event, or
    /// an array of up to this many.
    #[serde(default = "one")]
    pub batch: usize,
    /// Calls running at once (default 1).
    #[serde(default = "one")]
    pub concurrency: usize,
    /// How long a batch waits to fill once its first message is in, ms
    /// (default 0: the messages already delivered; at most
    /// [`MAX_BATCH_WINDOW_MS`]).
    #[serde(default)]
    pub batch_window_ms: u64,
}

fn one() -> usize {
    1
}

/// The kinds of document change a store trigger receives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StoreEvent {
    /// A document was created.
    Created,
    /// A document was changed.
    Updated,
    /// A document was deleted.
    Deleted,
}

impl StoreEvent {
    /// Its name, as events carry it.
    pub fn as_str(self) -> &'static str {
        match self {
            StoreEvent::Created => "created",
            StoreEvent::Updated => "updated",
            StoreEvent::Deleted => "deleted",
        }
    }
}

/// Changes of documents in one collection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreTrigger {
    /// The collection (defined in the store, or by the bundle's
    /// `collections`).
    pub collection: String,
    /// Which changes (default all three).
    #[serde(default = "all_events")]
    pub events: Vec<StoreEvent>,
}

fn all_events() -> Vec<StoreEvent> {
    vec![
        StoreEvent::Created,
        StoreEvent::Updated,
        StoreEvent::Deleted,
    ]
}

/// An entry as written, before it is checked.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    name: Option<String>,
    schedule: Option<Schedule>,
    queue: Option<QueueTrigger>,
    store: Option<StoreTrigger>,
    /// Refused with a reason until the Kafka adapter exists.
    topic: Option<Value>,
}

/// A trigger or collection name: 1 to 64 of `a-z 0-9 _ -`, starting with
/// a letter or a digit.
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{name:?}: use 1 to 64 of a-z 0-9 _ -, starting with a letter or digit"
        ))
    }
}

impl Schedule {
    fn parsed(&self) -> Result<(croner::Cron, chrono_tz::Tz), String> {
        let cron = CronParser::builder()
            .seconds(Seconds::Optional)
            .year(Year::Disallowed)
            .build()
            .parse(&self.cron)
            .map_err(|e| format!("cron {:?}: {e}", self.cron))?;
        let tz = chrono_tz::Tz::from_str(&self.timezone).map_err(|_| {
            format!(
                "unknown time zone {:?} (use an IANA name such as Europe/Paris or UTC)",
                self.timezone
            )
        })?;
        Ok((cron, tz))
    }

    /// The first tick strictly after `after_ms` (ms since the Unix epoch),
    /// in ms; `None` when there is none (an expression that never
    /// matches again) or the expression is bad.
    pub fn next_after(&self, after_ms: u64) -> Option<u64> {
        use chrono::TimeZone as _;
        let (cron, tz) = self.parsed().ok()?;
        // Ticks are whole seconds: the first strictly after `after_ms` is
        // the first at or after the next whole second.
        let from = i64::try_from(after_ms / 1000 * 1000 + 1000).ok()?;
        let start = tz.timestamp_millis_opt(from).single()?;
        let next = cron.find_next_occurrence(&start, true).ok()?;
        u64::try_from(next.timestamp()).ok().map(|s| s * 1000)
    }
}

impl Schedule {
    /// The last tick at or before `at_ms`, in ms; `None` when there is
    /// none or the expression is bad.
    pub fn last_at_or_before(&self, at_ms: u64) -> Option<u64> {
        use chrono::TimeZone as _;
        let (cron, tz) = self.parsed().ok()?;
        let from = i64::try_from(at_ms / 1000 * 1000).ok()?;
        let start = tz.timestamp_millis_opt(from).single()?;
        let last = cron.find_previous_occurrence(&start, true).ok()?;
        u64::try_from(last.timestamp()).ok().map(|s| s * 1000)
    }

    /// The ticks to fire at `now_ms` when the last one fired was
    /// `last_ms`, oldest first, by the catch-up rule: ticks after
    /// `last_ms` up to `now_ms`; of those older than `grace_ms`, none
    /// (`skip`), only the newest due tick (`latest`), or each, at most
    /// [`MAX_CATCH_UP`] (`all`).
    pub fn due(&self, last_ms: u64, now_ms: u64, grace_ms: u64) -> Vec<u64> {
        let mut ticks = Vec::new();
        let mut at = now_ms;
        while let Some(t) = self.last_at_or_before(at) {
            if t <= last_ms || ticks.len() == MAX_CATCH_UP {
                break;
            }
            ticks.push(t);
            match self.catch_up {
                CatchUp::Latest => break,
                CatchUp::Skip if now_ms.saturating_sub(t) > grace_ms => {
                    ticks.pop();
                    break;
                }
                _ => {}
            }
            if t < 1000 {
                break;
            }
            at = t - 1000;
        }
        ticks.reverse();
        ticks
    }
}

impl QueueTrigger {
    fn check(&self) -> Result<(), (String, String)> {
        let bad = |field: &str, why: String| Err((field.to_owned(), why));
        match (&self.queue, &self.exchange) {
            (Some(_), Some(_)) | (None, None) => {
                return bad("", "give `queue` (a queue to consume) or `exchange` (to bind a queue of the trigger's own), not both".into())
            }
            (Some(q), None) if q.is_empty() || q.len() > 200 => {
                return bad("queue", "1 to 200 characters".into())
            }
            (None, Some(e)) if e.is_empty() || e.len() > 200 => {
                return bad("exchange", "1 to 200 characters".into())
            }
            _ => {}
        }
        if self.binding_key.is_some() && self.exchange.is_none() {
            return bad("binding_key", "only with `exchange`".into());
        }
        if self
            .queue
            .as_deref()
            .is_some_and(|q| q.starts_with("funcatron."))
        {
            return bad(
                "queue",
                "the funcatron.* queues are the platform's own".into(),
            );
        }
        if !(1..=MAX_BATCH).contains(&self.batch) {
            return bad("batch", format!("1 to {MAX_BATCH}"));
        }
        if !(1..=MAX_CONCURRENCY).contains(&self.concurrency) {
            return bad("concurrency", format!("1 to {MAX_CONCURRENCY}"));
        }
        if self.batch_window_ms > MAX_BATCH_WINDOW_MS {
            return bad("batch_window_ms", format!("at most {MAX_BATCH_WINDOW_MS}"));
        }
        Ok(())
    }
}

/// The triggers of one operation, checked: `value` is its
/// `x-funcatron-triggers`; `method`, `template` and `operation_id` the
/// operation's. An error is (a JSON pointer below the extension, why).
pub fn parse(
    value: &Value,
    method: &str,
    template: &str,
    operation_id: &str,
) -> Result<Vec<Trigger>, (String, String)> {
    let list = value
        .as_array()
        .ok_or_else(|| (String::new(), "a list of triggers".to_owned()))?;
    if list.is_empty() {
        return Ok(Vec::new());
    }
    if !method.eq_ignore_ascii_case("post") {
        return Err((
            String::new(),
            format!(
                "triggers call the operation with POST; this one is {}",
                method.to_ascii_uppercase()
            ),
        ));
    }
    if template.contains('{') {
        return Err((
            String::new(),
            format!("a triggered operation's path has no parameters ({template} has)"),
        ));
    }
    if list.len() > MAX_TRIGGERS {
        return Err((String::new(), format!("at most {MAX_TRIGGERS} triggers")));
    }
    let mut out = Vec::with_capacity(list.len());
    for (i, entry) in list.iter().enumerate() {
        let at = |field: &str| {
            if field.is_empty() {
                format!("/{i}")
            } else {
                format!("/{i}/{field}")
            }
        };
        let raw: Raw =
            serde_json::from_value(entry.clone()).map_err(|e| (at(""), e.to_string()))?;
        let name = match raw.name {
            Some(n) => n,
            None if list.len() == 1 => operation_id.to_ascii_lowercase(),
            None => format!("{}-{i}", operation_id.to_ascii_lowercase()),
        };
        check_name(&name).map_err(|e| (at("name"), format!("trigger name {e}")))?;
        let kinds = [
            raw.schedule.is_some(),
            raw.queue.is_some(),
            raw.store.is_some(),
            raw.topic.is_some(),
        ];
        if kinds.iter().filter(|k| **k).count() != 1 {
            return Err((
                at(""),
                "give exactly one of `schedule`, `queue`, `store`".into(),
            ));
        }
        let kind = if let Some(s) = raw.schedule {
            s.parsed().map_err(|e| (at("schedule"), e))?;
            TriggerKind::Schedule(s)
        } else if let Some(q) = raw.queue {
            q.check()
                .map_err(|(f, e)| (at(format!("queue/{f}").trim_end_matches('/')), e))?;
            TriggerKind::Queue(q)
        } else if let Some(s) = raw.store {
            check_name(&s.collection)
                .map_err(|e| (at("store/collection"), format!("collection name {e}")))?;
            if s.events.is_empty() {
                return Err((
                    at("store/events"),
                    "at least one of created, updated, deleted".into(),
                ));
            }
            TriggerKind::Store(s)
        } else {
            return Err((
                at("topic"),
                "topic triggers need the Kafka broker adapter, which this build does not have yet"
                    .into(),
            ));
        };
        out.push(Trigger { name, kind });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    fn one(v: Value) -> Result<Vec<Trigger>, (String, String)> {
        parse(&v, "post", "/tick", "Tick")
    }

    #[test]
    fn entries_are_read_and_named() {
        let t = one(json!([{"schedule": {"cron": "*/5 * * * *"}}])).unwrap();
        assert_eq!(t[0].name, "tick");
        let t = one(json!([
            {"name": "a", "store": {"collection": "orders"}},
            {"queue": {"exchange": "events", "binding_key": "order.*", "batch": 5}}
        ]))
        .unwrap();
        assert_eq!(t[1].name, "tick-1");
        match &t[0].kind {
            TriggerKind::Store(s) => assert_eq!(s.events.len(), 3),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn bad_entries_name_their_field() {
        let e = one(json!([{"schedule": {"cron": "61 * * * *"}}])).unwrap_err();
        assert_eq!(e.0, "/0/schedule");
        let e = one(json!([{"schedule": {"cron": "* * * * *", "timezone": "Mars/Olympus"}}]))
            .unwrap_err();
        assert!(e.1.contains("time zone"), "{e:?}");
        let e = one(json!([{"queue": {"queue": "q", "batch": 0}}])).unwrap_err();
        assert_eq!(e.0, "/0/queue/batch");
        let e = one(json!([{"queue": {}}])).unwrap_err();
        assert_eq!(e.0, "/0/queue");
        let e = one(json!([{"store": {"collection": "Bad"}}])).unwrap_err();
        assert_eq!(e.0, "/0/store/collection");
        let e = one(
            json!([{"name": "x", "schedule": {"cron": "* * * * *"}, "store": {"collection": "c"}}]),
        )
        .unwrap_err();
        assert_eq!(e.0, "/0");
        let e = one(json!([{"topic": {"topic": "t"}}])).unwrap_err();
        assert!(e.1.contains("Kafka"), "{e:?}");
        let e = one(json!([{"schedule": {"cron": "* * * * *", "tz": "UTC"}}])).unwrap_err();
        assert_eq!(e.0, "/0");
        assert!(parse(
            &json!([{"schedule": {"cron": "* * * * *"}}]),
            "get",
            "/t",
            "t"
        )
        .is_err());
        assert!(parse(
            &json!([{"schedule": {"cron": "* * * * *"}}]),
            "post",
            "/t/{id}",
            "t"
        )
        .is_err());
    }

    #[test]
    fn schedules_tick_in_their_time_zone() {
        // 2026-01-01T00:00:00Z
        let start = 1_767_225_600_000;
        let every = Schedule {
            cron: "*/10 * * * * *".into(),
            timezone: utc(),
            catch_up: CatchUp::Latest,
        };
        assert_eq!(every.next_after(start), Some(start + 10_000));
        assert_eq!(every.next_after(start + 1), Some(start + 10_000));
        let five = Schedule {
            cron: "0 9 * * *".into(),
            timezone: "Europe/Paris".into(),
            catch_up: CatchUp::Skip,
        };
        // 09:00 in Paris in winter is 08:00 UTC.
        assert_eq!(five.next_after(start), Some(start + 8 * 3_600_000));
        assert_eq!(every.last_at_or_before(start + 9_999), Some(start));
        assert_eq!(
            every.last_at_or_before(start + 10_000),
            Some(start + 10_000)
        );
    }

    #[test]
    fn missed_ticks_follow_the_catch_up_rule() {
        let start = 1_767_225_600_000; // a whole minute
        let mut s = Schedule {
            cron: "* * * * *".into(),
            timezone: utc(),
            catch_up: CatchUp::Latest,
        };
        let min = 60_000;
        // On time: the one tick since the last.
        assert_eq!(s.due(start, start + min + 5, 10_000), vec![start + min]);
        assert!(
            s.due(start + min, start + min + 5, 10_000).is_empty(),
            "fired already"
        );
        // After a ten-minute outage.
        let now = start + 10 * min + 30_000;
        assert_eq!(s.due(start, now, 10_000), vec![start + 10 * min]);
        s.catch_up = CatchUp::Skip;
        assert!(
            s.due(start, now, 10_000).is_empty(),
            "skip: 30 s late is missed"
        );
        assert_eq!(
            s.due(start, start + 10 * min + 5, 10_000),
            vec![start + 10 * min],
            "skip: on time still fires"
        );
        s.catch_up = CatchUp::All;
        let all = s.due(start, now, 10_000);
        assert_eq!(all, (1..=10).map(|i| start + i * min).collect::<Vec<_>>());
        let long = s.due(start, start + 1000 * min, 10_000);
        assert_eq!(long.len(), MAX_CATCH_UP, "at most MAX_CATCH_UP");
        assert_eq!(long.last(), Some(&(start + 1000 * min)), "the newest ones");
    }
}
