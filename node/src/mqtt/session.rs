//! Live MQTT connections on this node, by client id.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};

/// A direct method's answer from the device.
#[derive(Debug, Clone, PartialEq)]
pub struct MethodReply {
    /// Status the device chose.
    pub status: i32,
    /// Its payload (JSON; `null` when empty or not JSON).
    pub payload: Value,
}

/// Work for a connection task.
#[derive(Debug)]
pub enum Outbound {
    /// Push desired properties (if subscribed).
    DesiredPatch {
        /// `$version` of the patch.
        version: u64,
        /// Payload (JSON with `$version`).
        payload: Bytes,
    },
    /// Invoke a direct method (fails fast if the device is not subscribed).
    Method {
        /// Method name.
        name: String,
        /// JSON payload.
        payload: Bytes,
        /// Where the device's answer goes.
        reply: oneshot::Sender<Result<MethodReply, &'static str>>,
    },
    /// C2D messages may be waiting.
    C2dAvailable,
    /// Re-check the identity (it changed or was deleted).
    Recheck,
    /// Close: another connection with the same client id took over.
    TakenOver,
    /// The node is being drained: close so the device reconnects to another node.
    Drain,
}

/// Rung after work is queued for a connection, so that it need not poll its queue while
/// waiting for its device (the MQTT connection's outlet; AMQP links wait on the queue itself).
pub trait Doorbell: Send + Sync {
    fn ring(&self);
}

#[derive(Clone)]
struct Entry {
    id: u64,
    tx: mpsc::Sender<Outbound>,
    doorbell: Option<Arc<dyn Doorbell>>,
}

impl Entry {
    /// Queues `work` for the connection and rings its doorbell; false when the queue is full or
    /// gone.
    fn deliver(&self, work: Outbound) -> bool {
        let queued = self.tx.try_send(work).is_ok();
        if queued && let Some(bell) = &self.doorbell {
            bell.ring();
        }
        queued
    }
}

/// The registry of live connections. Cheap to clone.
#[derive(Clone, Default)]
pub struct Sessions {
    inner: Arc<Mutex<(u64, HashMap<String, Entry>)>>,
}

/// Handle a connection keeps while it is registered.
pub struct Registration {
    /// Unique id of this connection.
    pub id: u64,
    /// Where outbound work arrives.
    pub rx: mpsc::Receiver<Outbound>,
}

impl Sessions {
    /// Registers a connection for `client_id`, telling any previous one to close (one live
    /// connection per device).
    pub fn register(&self, client_id: &str) -> Registration {
        self.register_with_doorbell(client_id, None)
    }

    /// Like [`Sessions::register`]; `doorbell` is rung after each piece of work is queued.
    pub fn register_with_doorbell(
        &self,
        client_id: &str,
        doorbell: Option<Arc<dyn Doorbell>>,
    ) -> Registration {
        let (tx, rx) = mpsc::channel(256);
        let previous = {
            let Ok(mut guard) = self.inner.lock() else {
                return Registration { id: 0, rx };
            };
            guard.0 += 1;
            let id = guard.0;
            let previous = guard
                .1
                .insert(client_id.to_string(), Entry { id, tx, doorbell });
            (id, previous)
        };
        if let Some(old) = previous.1 {
            old.deliver(Outbound::TakenOver);
        }
        Registration { id: previous.0, rx }
    }

    /// Removes the registration if it is still the current one for `client_id`; returns whether
    /// it was.
    pub fn unregister(&self, client_id: &str, id: u64) -> bool {
        if let Ok(mut guard) = self.inner.lock()
            && guard.1.get(client_id).is_some_and(|e| e.id == id)
        {
            guard.1.remove(client_id);
            return true;
        }
        false
    }

    /// Sends work to the live connection of `client_id`; false when there is none.
    pub fn send(&self, client_id: &str, work: Outbound) -> bool {
        let entry = self
            .inner
            .lock()
            .ok()
            .and_then(|g| g.1.get(client_id).cloned());
        entry.is_some_and(|e| e.deliver(work))
    }

    /// Client ids connected to this node whose device is `device_id` (the device and its
    /// modules).
    pub fn clients_of(&self, device_id: &str) -> Vec<String> {
        self.inner
            .lock()
            .map(|g| {
                g.1.keys()
                    .filter(|k| k.as_str() == device_id || k.starts_with(&format!("{device_id}/")))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Whether `client_id` is connected here.
    pub fn is_connected(&self, client_id: &str) -> bool {
        self.inner
            .lock()
            .map(|g| g.1.contains_key(client_id))
            .unwrap_or(false)
    }

    /// Live connections on this node.
    /// Tells every connection on this node to close (drain); returns how many were told.
    pub fn close_all(&self) -> usize {
        let entries: Vec<Entry> = self
            .inner
            .lock()
            .map(|g| g.1.values().cloned().collect())
            .unwrap_or_default();
        entries
            .iter()
            .filter(|e| e.deliver(Outbound::Drain))
            .count()
    }

    pub fn count(&self) -> usize {
        self.inner.lock().map(|g| g.1.len()).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn second_registration_takes_over() {
        let sessions = Sessions::default();
        let mut first = sessions.register("d1");
        let second = sessions.register("d1");
        assert!(matches!(first.rx.recv().await, Some(Outbound::TakenOver)));
        // the old connection's cleanup must not remove the new one
        sessions.unregister("d1", first.id);
        assert!(sessions.is_connected("d1"));
        sessions.unregister("d1", second.id);
        assert!(!sessions.is_connected("d1"));
        let _m = sessions.register("d1/m1");
        assert_eq!(sessions.clients_of("d1"), vec!["d1/m1".to_string()]);
        assert!(sessions.clients_of("d").is_empty());
    }

    #[derive(Default)]
    struct Rings(std::sync::atomic::AtomicUsize);

    impl Doorbell for Rings {
        fn ring(&self) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    #[tokio::test]
    async fn queued_work_rings_the_connections_doorbell() {
        let sessions = Sessions::default();
        let rings = Arc::new(Rings::default());
        let count = || rings.0.load(std::sync::atomic::Ordering::SeqCst);
        let mut first = sessions.register_with_doorbell("d1", Some(rings.clone()));
        assert!(sessions.send("d1", Outbound::C2dAvailable));
        assert_eq!(count(), 1);
        assert!(matches!(first.rx.try_recv(), Ok(Outbound::C2dAvailable)));
        assert_eq!(sessions.close_all(), 1);
        assert_eq!(count(), 2);
        // Taken over: the old connection is told and rung.
        let _second = sessions.register("d1");
        assert_eq!(count(), 3);
        assert!(matches!(first.rx.try_recv(), Ok(Outbound::Drain)));
        assert!(matches!(first.rx.try_recv(), Ok(Outbound::TakenOver)));
        assert!(!sessions.send("d2", Outbound::C2dAvailable));
        assert_eq!(count(), 3);
    }
}
