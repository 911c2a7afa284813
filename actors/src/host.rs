//! [`Host`]: what every actor needs of the peer it runs on (each actor's
//! own host trait adds what only it calls).

use fogmesh_protocols::Message;

use crate::config::RuntimeConfig;
use crate::link::LinkError;

/// The peer an actor runs on, as every actor sees it.
#[async_trait::async_trait]
pub trait Host: Send + Sync + 'static {
    /// This peer's id.
    fn local_peer(&self) -> &str;
    /// The runtime's bounds, timeouts and intervals.
    fn config(&self) -> &RuntimeConfig;
    /// Sends stage traffic to `peer` (looped back in-process when it is this
    /// peer). `Ok` means it was written, not that it was processed.
    async fn send(&self, peer: &str, msg: Message) -> Result<(), LinkError>;
}
