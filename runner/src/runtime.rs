//! The runtime seam: prepare a bundle once, invoke it many times.

use std::future::Future;

use crate::invoke::{Handled, Job};

/// A language runtime serving a set of prepared bundles.
pub trait Runtime: Send + Sync + 'static {
    /// Invoke `func` for one request and return what to publish.
    fn invoke(&self, func: &str, job: Job) -> impl Future<Output = Handled> + Send;
}
