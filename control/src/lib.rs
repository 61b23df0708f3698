//! The control protocol: what every Funcatron component agrees on beside
//! the request envelope (`funcatron-envelope`).
//!
//! - [`admission`]: the table Trons broadcast so ingresses refuse async
//!   calls a Func has no room for, or does not take, before queueing;
//! - [`names`]: the queues of the request path (requests, Func queues,
//!   reply queues, dead letters) and the broadcast topics of the control
//!   plane (control, stats, logs, capture);
//! - [`headers`]: the message headers set beside the envelope body;
//! - [`state`]: the registry's cluster state, the messages on the control
//!   topic and the Runners' heartbeats;
//! - [`fetch`]: fetching a bundle archive by SHA-256 from a Tron's
//!   management API and verifying it (Trons adopting a peer's state and
//!   Runners following the registry both use it);
//! - [`outbound`]: where requests made on someone else's word (fetch
//!   URLs from control messages, replay, callbacks) may go;
//! - [`redact`]: redacting captured pairs (Runners before they
//!   broadcast, Trons before they store);
//! - [`sync`]: the one lock idiom (a poisoned lock is logged and counted).
//!
//! Nothing here talks to a broker: the broker seam (`funcatron-broker`)
//! carries these names and bytes.

#![warn(clippy::too_many_lines)]

pub mod admission;
pub mod calls;
pub mod fetch;
pub mod headers;
pub mod names;
pub mod outbound;
pub mod redact;
pub mod state;
pub mod sync;
