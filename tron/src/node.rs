//! One Tron node, composed in one place: `funcatron tron`, `funcatron up`,
//! `funcatron dev`, the benchmarks and the tests all build a Tron here.
//!
//! A node is its [`TronContext`] (broker, demand, heartbeats) plus what
//! it was asked to run: the dispatcher always; with a store, the
//! [`Registry`] (its follower and collector) and the management API on a
//! listener it is given; with a substrate, the [`Autoscaler`].
//! [`TronNode::run`] runs them until `shutdown`, then lets in-flight
//! dispatches finish and the autoscaler stop what it started.

use std::sync::Arc;

use axum::Router;
use funcatron_broker::{AnyBroker, BrokerError};
use funcatron_bundle::Bundle;
use funcatron_ingress::IngressOptions;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::autoscale::{Autoscaler, AutoscalerOptions, Substrate};
use crate::context::TronContext;
use crate::dispatch::{self, TronOptions};
use crate::registry::{Registry, RegistryError, RegistryOptions};
use crate::routes::{RouteError, RouteTable};

/// Why a Tron node could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The static bundles claim the same route.
    #[error(transparent)]
    Routes(#[from] RouteError),
    /// The bundle store could not be opened.
    #[error("opening the bundle store {store}: {source}")]
    Store {
        /// The store directory.
        store: String,
        /// Why.
        source: RegistryError,
    },
    /// The broker refused to let the dispatcher consume.
    #[error(transparent)]
    Broker(#[from] BrokerError),
    /// The management API's invoke path could not start.
    #[error("starting the management API's invoke path: {0}")]
    Invoke(String),
}

/// The registry and its management API.
pub struct Management {
    /// The registry's settings (store, advertise URL, checks, ...).
    pub registry: RegistryOptions,
    /// Where the management API listens (bound by the caller, so tests
    /// bind port 0).
    pub listener: TcpListener,
    /// The API's tokens, upload limit and capture redaction.
    pub api: crate::mgmt::MgmtOptions,
    /// Routes served beside the API (for example `/metrics`).
    pub extra: Router,
    /// Timeouts and the connection limit of its listener.
    pub limits: funcatron_listener::Limits,
}

/// A Tron, to configure and [`run`](TronNode::run).
pub struct TronNode {
    ctx: TronContext,
    options: TronOptions,
    bundles: Vec<Bundle>,
    management: Option<Management>,
    scaler: Option<(Arc<dyn Substrate>, AutoscalerOptions)>,
    routes: Option<watch::Receiver<Arc<RouteTable>>>,
    calls: Option<funcatron_calls::Calls>,
    /// The document store on that state store, whose events it relays.
    documents: Option<funcatron_documents::Documents>,
    /// What is served, for triggers and store access, when it has no
    /// registry and its bundles are not fixed (`funcatron dev`).
    served: Option<watch::Receiver<Arc<crate::registry::Served>>>,
    /// Where callbacks may be delivered.
    callback_outbound: funcatron_control::outbound::OutboundPolicy,
}

impl TronNode {
    /// A Tron on `broker` with default options and no bundles.
    pub fn new(broker: AnyBroker) -> Self {
        TronNode {
            ctx: TronContext::new(broker),
            options: TronOptions::default(),
            bundles: Vec::new(),
            management: None,
            scaler: None,
            routes: None,
            calls: None,
            documents: None,
            served: None,
            callback_outbound: funcatron_control::outbound::OutboundPolicy::default(),
        }
    }

    /// Take the served bundles (their triggers, their store declarations)
    /// from this watch: for a Tron without a registry whose bundles change
    /// (`funcatron dev`); ignored with a registry.
    pub fn served(mut self, served: watch::Receiver<Arc<crate::registry::Served>>) -> Self {
        self.served = Some(served);
        self
    }

    /// Deliver callbacks only where `policy` allows (by default: no
    /// loopback, private or metadata address).
    pub fn callbacks_to(mut self, policy: funcatron_control::outbound::OutboundPolicy) -> Self {
        self.callback_outbound = policy;
        self
    }

    /// Apply asynchronous calls' outcomes to their records in this state
    /// store ([`funcatron_calls::outcomes`]): retries, dead letters,
    /// final states.
    pub fn calls(mut self, calls: funcatron_calls::Calls) -> Self {
        self.calls = Some(calls);
        self
    }

    /// Relay the change events of this document store (on the calls'
    /// state store) to the triggers of the served bundles
    /// ([`crate::triggers`]), and define the collections they bring.
    pub fn documents(mut self, documents: funcatron_documents::Documents) -> Self {
        self.documents = Some(documents);
        self
    }

    /// The dispatcher's options.
    pub fn options(mut self, options: TronOptions) -> Self {
        self.options = options;
        self
    }

    /// Route these bundles (with a registry: besides the enabled ones).
    pub fn bundles(mut self, bundles: Vec<Bundle>) -> Self {
        self.bundles = bundles;
        self
    }

    /// Route whatever this watch holds instead (`funcatron dev` switches
    /// tables itself); ignored with a registry.
    pub fn routes(mut self, routes: watch::Receiver<Arc<RouteTable>>) -> Self {
        self.routes = Some(routes);
        self
    }

    /// Keep a registry in a store and serve the management API.
    pub fn management(mut self, management: Management) -> Self {
        self.management = Some(management);
        self
    }

    /// Scale Runners on `substrate`.
    pub fn autoscaler(mut self, substrate: Arc<dyn Substrate>, options: AutoscalerOptions) -> Self {
        self.scaler = Some((substrate, options));
        self
    }

    /// This node's context (its demand and heartbeats), for tests and
    /// benchmarks that look inside.
    pub fn context(&self) -> &TronContext {
        &self.ctx
    }

    /// Run until `shutdown`; in-flight dispatches finish first and the
    /// autoscaler stops the Runners it started.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), NodeError> {
        let TronNode {
            ctx,
            options,
            bundles,
            management,
            scaler,
            routes,
            calls,
            documents,
            served: given_served,
            callback_outbound,
        } = self;
        ctx.start(&shutdown);
        {
            let (broker, stop, c) = (ctx.broker.clone(), shutdown.clone(), calls.clone());
            tokio::spawn(async move {
                if let Err(e) = funcatron_calls::phases::run(broker, c, stop).await {
                    tracing::error!(error = %e, "the flow phases consumer stopped");
                }
            });
        }
        if let Some(calls) = calls.clone() {
            let deliverer =
                match funcatron_calls::callbacks::Deliverer::new(calls.clone(), callback_outbound)
                    .await
                {
                    Ok(d) => Some(d),
                    Err(e) => {
                        tracing::error!(error = %e, "callbacks are not delivered");
                        None
                    }
                };
            let (broker, stop, d) = (ctx.broker.clone(), shutdown.clone(), deliverer.clone());
            tokio::spawn(async move {
                if let Err(e) = funcatron_calls::outcomes::run(broker, calls, d, stop).await {
                    tracing::error!(error = %e, "the outcomes consumer stopped");
                }
            });
            if let Some(d) = deliverer {
                let (broker, stop) = (ctx.broker.clone(), shutdown.clone());
                tokio::spawn(async move {
                    if let Err(e) = funcatron_calls::callbacks::run(broker, d, stop).await {
                        tracing::error!(error = %e, "the callback deliverer stopped");
                    }
                });
            }
        }
        let static_bundles = documents.as_ref().map(|_| bundles.clone());
        let (routes, registry) = match management {
            Some(m) => {
                let (registry, routes) =
                    serve_management(&ctx, bundles, m, calls.clone(), &shutdown).await?;
                (routes, Some(registry))
            }
            None => match routes {
                Some(r) => (r, None),
                None => (dispatch::fixed(RouteTable::build(&bundles)?), None),
            },
        };
        if let (Some(docs), Some(calls)) = (documents, calls) {
            let served = match (&registry, given_served) {
                (Some(r), _) => r.served_watch(),
                (None, Some(s)) => s,
                (None, None) => {
                    let only = crate::registry::Served {
                        bundles: static_bundles.unwrap_or_default(),
                        ..Default::default()
                    };
                    watch::channel(Arc::new(only)).1
                }
            };
            spawn_triggers(&ctx, docs, calls, served, &shutdown);
        }
        let scaling = scaler.map(|(substrate, o)| {
            let settings = registry.as_ref().map(|r| r.settings());
            let a = Autoscaler::new(substrate, o, ctx.clone(), routes.clone(), settings);
            if let Some(r) = &registry {
                r.attach_autoscaler(Arc::clone(&a));
            }
            tokio::spawn(a.run(shutdown.clone()))
        });
        let result = dispatch::run(ctx, routes, options, shutdown).await;
        if let Some(t) = scaling {
            if let Err(e) = t.await {
                tracing::error!(error = %e, "the autoscaler ended abnormally");
            }
        }
        Ok(result?)
    }
}

/// Answer Funcs' store requests, follow what is served for its triggers
/// (and the collections its bundles bring), fire its schedules, consume
/// its queue triggers' queues, and relay the document store's events to
/// its store triggers.
fn spawn_triggers(
    ctx: &TronContext,
    docs: funcatron_documents::Documents,
    calls: funcatron_calls::Calls,
    served: watch::Receiver<Arc<crate::registry::Served>>,
    shutdown: &CancellationToken,
) {
    tokio::spawn(crate::store_rpc::serve(
        docs.clone(),
        ctx.broker.clone(),
        served.clone(),
        shutdown.clone(),
    ));
    let (tx, rx) = watch::channel(Arc::default());
    tokio::spawn(crate::triggers::follow(
        served,
        Some(docs.clone()),
        tx,
        shutdown.clone(),
    ));
    let holder = format!("tron-{}", &funcatron_envelope::new_request_id()[..12]);
    let scheduler = crate::schedules::Scheduler::new(
        calls.clone(),
        ctx.broker.clone(),
        holder.clone(),
        crate::schedules::LEASE_TTL,
    );
    tokio::spawn(crate::schedules::run(
        scheduler,
        rx.clone(),
        shutdown.clone(),
    ));
    tokio::spawn(crate::queue_triggers::run(
        calls.clone(),
        ctx.broker.clone(),
        rx.clone(),
        shutdown.clone(),
    ));
    tokio::spawn(crate::triggers::announce(
        docs.clone(),
        ctx.broker.clone(),
        holder.clone(),
        shutdown.clone(),
    ));
    tokio::spawn(crate::triggers::relay(
        docs,
        calls,
        ctx.broker.clone(),
        rx,
        holder,
        crate::triggers::RELAY_POLL,
        shutdown.clone(),
    ));
}

/// Open the registry, follow the control topic, collect captures and
/// logs, and serve the management API on its listener.
async fn serve_management(
    ctx: &TronContext,
    bundles: Vec<Bundle>,
    m: Management,
    calls: Option<funcatron_calls::Calls>,
    shutdown: &CancellationToken,
) -> Result<(Arc<Registry>, watch::Receiver<Arc<RouteTable>>), NodeError> {
    let store = m.registry.store.display().to_string();
    let mut options = m.registry;
    options.static_bundles.extend(bundles);
    let (registry, routes) = Registry::open(options, ctx.clone())
        .await
        .map_err(|source| NodeError::Store { store, source })?;
    tokio::spawn(Arc::clone(&registry).follow(shutdown.clone()));
    tokio::spawn(Arc::clone(&registry).collect(shutdown.clone()));
    let invoker = funcatron_ingress::app(
        ctx.broker.clone(),
        IngressOptions::default(),
        shutdown.clone(),
    )
    .await
    .map_err(|e| NodeError::Invoke(e.to_string()))?;
    let api = crate::mgmt::router_with_calls(Arc::clone(&registry), m.api, Some(invoker), calls)
        .merge(m.extra);
    let stop = shutdown.clone();
    tokio::spawn(async move {
        if let Err(e) =
            funcatron_listener::serve("management", m.listener, api, m.limits, stop).await
        {
            tracing::error!(error = %e, "the management API stopped");
        }
    });
    Ok((registry, routes))
}
