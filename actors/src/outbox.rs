//! Stage traffic leaving an actor without the actor waiting on the network:
//! one FIFO per destination peer, drained by its own task, all of them
//! bounded together in bytes. A slow or stalled link then delays only what
//! goes over it, not every other session the actor serves.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use fogmesh_protocols::{Message, StageInput};
use tokio::sync::mpsc;

use crate::host::Host;
use crate::link::{LinkError, PeerKey};
use crate::links::LinkMeter;

/// What runs when a queued message could not be sent (or queued).
pub type OnFail = Box<dyn FnOnce(LinkError) + Send>;

/// Bytes counted for a message besides its activation payload.
const OVERHEAD_BYTES: usize = 256;
/// A destination's task ends after this long with nothing to send.
const IDLE: Duration = Duration::from_secs(30);

struct Item {
    msg: Message,
    bytes: usize,
    on_fail: Option<OnFail>,
}

/// An actor's outgoing messages.
pub struct Outbox {
    host: Arc<dyn Host>,
    /// Where each send's time is recorded.
    meter: Arc<LinkMeter>,
    queues: HashMap<PeerKey, mpsc::UnboundedSender<Item>>,
    /// Bytes queued over every destination (shared with their tasks).
    queued: Arc<AtomicUsize>,
    limit: usize,
}

/// What `msg` counts against the bound.
fn size(msg: &Message) -> usize {
    OVERHEAD_BYTES
        + match msg {
            Message::StageRequest(r) => match &r.input {
                StageInput::Activation(b) => b.len(),
                StageInput::Tokens(t) => t.len() * 4,
            },
            _ => 0,
        }
}

impl Outbox {
    /// An outbox sending through `host`, holding at most `limit` bytes
    /// queued, timing each send into `meter`.
    pub fn new(host: Arc<dyn Host>, meter: Arc<LinkMeter>, limit: usize) -> Self {
        Outbox { host, meter, queues: HashMap::new(), queued: Arc::new(AtomicUsize::new(0)), limit }
    }

    /// Bytes queued now.
    pub fn queued_bytes(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }

    /// Queues `msg` for `to`, after everything queued for `to` before it.
    /// When it cannot be sent, or the outbox is full, `on_fail` runs (in
    /// the destination's task, or here at once).
    pub fn push(&mut self, to: &str, msg: Message, on_fail: impl FnOnce(LinkError) + Send + 'static) {
        let bytes = size(&msg);
        let queued = self.queued.load(Ordering::Relaxed);
        if queued + bytes > self.limit {
            on_fail(LinkError::Unreachable(to.into(), format!("the link is backed up: {queued} bytes are waiting to be sent")));
            return;
        }
        self.queued.fetch_add(bytes, Ordering::Relaxed);
        self.meter.queued(to, bytes);
        self.queues.retain(|_, tx| !tx.is_closed());
        let mut item = Item { msg, bytes, on_fail: Some(Box::new(on_fail)) };
        // A destination whose task has just ended gets a new one.
        for _ in 0..2 {
            let (host, meter, queued) = (&self.host, &self.meter, &self.queued);
            let tx = self.queues.entry(to.into()).or_insert_with(|| drain(host.clone(), meter.clone(), to.into(), queued.clone()));
            match tx.send(item) {
                Ok(()) => return,
                Err(mpsc::error::SendError(back)) => {
                    self.queues.remove(to);
                    item = back;
                }
            }
        }
        self.queued.fetch_sub(item.bytes, Ordering::Relaxed);
        self.meter.dropped(to, item.bytes);
        if let Some(f) = item.on_fail {
            f(LinkError::Stopped);
        }
    }
}

/// The task sending `to`'s queue in order; it ends when idle, after sending
/// whatever raced into its queue.
fn drain(host: Arc<dyn Host>, meter: Arc<LinkMeter>, to: PeerKey, queued: Arc<AtomicUsize>) -> mpsc::UnboundedSender<Item> {
    let (tx, mut rx) = mpsc::unbounded_channel::<Item>();
    tokio::spawn(async move {
        let send = |item: Item| {
            let (host, meter, to, queued) = (host.clone(), meter.clone(), to.clone(), queued.clone());
            async move {
                let started = std::time::Instant::now();
                let r = host.send(&to, item.msg).await;
                if r.is_ok() {
                    meter.record(&to, item.bytes, started.elapsed());
                } else {
                    meter.dropped(&to, item.bytes);
                }
                queued.fetch_sub(item.bytes, Ordering::Relaxed);
                if let (Err(e), Some(f)) = (r, item.on_fail) {
                    f(e);
                }
            }
        };
        while let Ok(Some(item)) = tokio::time::timeout(IDLE, rx.recv()).await {
            send(item).await;
        }
        rx.close();
        while let Ok(item) = rx.try_recv() {
            send(item).await;
        }
    });
    tx
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RuntimeConfig;
    use fogmesh_protocols::{SessionClose, StageRequest};
    use std::sync::Mutex;

    /// A host whose sends to "slow" take 200 ms and to "gone" fail; it
    /// records what arrived, in order.
    struct Recorder {
        cfg: RuntimeConfig,
        got: Mutex<Vec<(String, u64)>>,
    }

    #[async_trait::async_trait]
    impl Host for Recorder {
        fn local_peer(&self) -> &str {
            "me"
        }
        fn config(&self) -> &RuntimeConfig {
            &self.cfg
        }
        async fn send(&self, peer: &str, msg: Message) -> Result<(), LinkError> {
            match peer {
                "slow" => tokio::time::sleep(Duration::from_millis(200)).await,
                "gone" => return Err(LinkError::Unreachable(peer.into(), "refused".into())),
                _ => {}
            }
            let Message::SessionClose(c) = msg else { return Ok(()) };
            self.got.lock().unwrap().push((peer.to_string(), c.session));
            Ok(())
        }
    }

    fn close(session: u64) -> Message {
        Message::SessionClose(SessionClose { session })
    }

    #[tokio::test]
    async fn a_slow_destination_does_not_hold_up_the_others_and_each_keeps_its_order() {
        let host = Arc::new(Recorder { cfg: RuntimeConfig::default(), got: Mutex::new(Vec::new()) });
        let mut out = Outbox::new(host.clone(), Arc::new(LinkMeter::new(Default::default())), 1 << 20);
        for i in 0..5 {
            out.push("slow", close(i), |_| {});
            out.push("fast", close(100 + i), |_| {});
        }
        let failed = Arc::new(Mutex::new(None));
        let f = failed.clone();
        out.push("gone", close(9), move |e| *f.lock().unwrap() = Some(e.to_string()));
        tokio::time::sleep(Duration::from_millis(100)).await;
        let fast: Vec<u64> = host.got.lock().unwrap().iter().filter(|(p, _)| p == "fast").map(|(_, s)| *s).collect();
        assert_eq!(fast, vec![100, 101, 102, 103, 104], "fast is served while slow is still sending");
        assert!(failed.lock().unwrap().as_deref().is_some_and(|e| e.contains("refused")));
        tokio::time::sleep(Duration::from_millis(1200)).await;
        let slow: Vec<u64> = host.got.lock().unwrap().iter().filter(|(p, _)| p == "slow").map(|(_, s)| *s).collect();
        assert_eq!(slow, vec![0, 1, 2, 3, 4]);
        assert_eq!(out.queued_bytes(), 0);
    }

    #[tokio::test]
    async fn past_the_byte_bound_a_message_fails_at_once() {
        let host = Arc::new(Recorder { cfg: RuntimeConfig::default(), got: Mutex::new(Vec::new()) });
        let mut out = Outbox::new(host, Arc::new(LinkMeter::new(Default::default())), 10_000);
        let big = || {
            Message::StageRequest(StageRequest {
                request: 1,
                session: 1,
                step: 0,
                stage: 1,
                position: 0,
                sample: false,
                input: StageInput::Activation(vec![0u8; 4000]),
            })
        };
        let refused = Arc::new(AtomicUsize::new(0));
        for _ in 0..4 {
            let r = refused.clone();
            out.push("slow", big(), move |_| {
                r.fetch_add(1, Ordering::Relaxed);
            });
        }
        assert_eq!(refused.load(Ordering::Relaxed), 2, "two fit in 10 000 bytes, two do not");
        assert!(out.queued_bytes() <= 10_000);
    }
}
