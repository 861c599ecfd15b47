//! Discovery: turns a plugin's [`Target`] into a stream of endpoint changes
//! for tower's balancer. Static targets insert their addresses once; DNS
//! targets plug in here, behind the same [`Change`] stream.

use std::{convert::Infallible, net::SocketAddr};

use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tower::discover::Change;

use crate::config::Target;

/// The stream a balancer reads endpoint changes from.
pub type ChangeStream<S> = UnboundedReceiverStream<Result<Change<SocketAddr, S>, Infallible>>;

/// Feeds endpoint changes to one balancer. Dropping it would end the stream,
/// which the balancer treats as fatal, so the backend keeps it for its lifetime.
pub struct Discovery<S> {
    tx: mpsc::UnboundedSender<Result<Change<SocketAddr, S>, Infallible>>,
}

impl<S> Discovery<S> {
    /// A discovery and the stream it feeds.
    pub fn new() -> (Self, ChangeStream<S>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Self { tx }, UnboundedReceiverStream::new(rx))
    }

    /// Inserts every address of a static target, making each endpoint with `make`.
    /// Returns how many were inserted.
    pub fn start(&self, target: &Target, mut make: impl FnMut(SocketAddr) -> S) -> usize {
        match target {
            Target::Static(addrs) => {
                for &addr in addrs {
                    // The receiver lives in the balancer, which outlives this sender's use.
                    let _ = self.tx.send(Ok(Change::Insert(addr, make(addr))));
                }
                addrs.len()
            }
        }
    }
}
