//! A device connection's way out. Every packet the hub sends on a connection goes through its
//! outlet, in order. The PUBACK of a telemetry message is written by the task that settles the
//! message's partition batch, right after the batch commits, instead of waking the connection to
//! write it: one task wake-up per message instead of two (docs/adr/019). What cannot finish there
//! (the socket is full, a write or the append failed) is left to the connection, which is woken
//! for it.

use std::future::poll_fn;
use std::pin::Pin;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Waker};

use bytes::{Buf, BytesMut};
use rumqttc::mqttbytes::v4::Packet;
use tokio::io::{AsyncWrite, WriteHalf};

use super::session::Doorbell;
use crate::domain::HubError;
use crate::partition::AppendWatcher;

/// The tag of an append whose settling writes no PUBACK (QoS 0).
pub(super) const NO_PUBACK: u64 = u64::MAX;

/// A send buffer that grew past this (a large C2D message) is given back once drained, so an
/// idle connection keeps no large buffer.
const KEEP_BUFFER_BYTES: usize = 4096;

pub(super) struct Outlet<S> {
    state: Mutex<State<S>>,
    /// The connection's task. Every write is polled with its waker, so however a write stalls,
    /// the socket's readiness wakes the connection, which finishes it.
    task: Waker,
    /// Set (and the task woken) when the connection must look at the outlet: bytes left
    /// unwritten, a write or an append failed, or work was queued (`mail`).
    attention: AtomicBool,
    /// Work was queued for the connection since it last looked (its doorbell rang).
    mail: AtomicBool,
}

struct State<S> {
    half: WriteHalf<S>,
    /// Encoded and not yet taken by the stream, in send order.
    out: BytesMut,
    /// Written into the stream and not yet flushed.
    unflushed: bool,
    /// A telemetry append of this connection has not settled yet (there is at most one: a
    /// connection handles its next packet only after it settled, which keeps the device's
    /// messages and acknowledgements in order).
    appending: bool,
    /// Waits for the append to settle.
    waiter: Option<Waker>,
    /// Why the last append failed: the connection closes without acknowledging it.
    failed: Option<HubError>,
    /// A write failed: the device is gone.
    broken: bool,
    /// The stream was shut down: an append settling later (after the close gave up waiting for
    /// it) writes nothing after the end of the stream.
    closed: bool,
}

impl<S> State<S> {
    /// Whether bytes may still go to the device.
    fn writable(&self) -> bool {
        !self.broken && !self.closed
    }
}

/// Why the outlet cannot go on.
#[derive(Debug)]
pub(super) enum Stopped {
    /// A telemetry append failed (not acknowledged).
    AppendFailed(HubError),
    /// Writing to the device failed.
    Broken,
}

impl<S: AsyncWrite> Outlet<S> {
    /// An outlet writing to `half`, polled with `task`'s waker (the connection's task).
    pub(super) fn new(half: WriteHalf<S>, task: Waker) -> Self {
        Self {
            state: Mutex::new(State {
                half,
                out: BytesMut::new(),
                unflushed: false,
                appending: false,
                waiter: None,
                failed: None,
                broken: false,
                closed: false,
            }),
            task,
            attention: AtomicBool::new(false),
            mail: AtomicBool::new(false),
        }
    }

    /// Whether work was queued since the last call.
    pub(super) fn take_mail(&self) -> bool {
        self.mail.load(Ordering::Acquire) && self.mail.swap(false, Ordering::AcqRel)
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, State<S>>, Stopped> {
        self.state.lock().map_err(|_| Stopped::Broken)
    }

    /// Sends `packet` after everything sent before it and waits until the stream took and
    /// flushed it.
    pub(super) async fn send(&self, packet: Packet) -> Result<(), Stopped> {
        {
            let mut state = self.lock()?;
            if !state.writable() {
                return Err(Stopped::Broken);
            }
            let before = state.out.len();
            if packet.write(&mut state.out, usize::MAX).is_err() {
                // No fragment of a packet that failed to encode may reach the device.
                state.out.truncate(before);
                return Err(Stopped::Broken);
            }
        }
        self.drain().await
    }

    /// Waits until everything sent so far is written and flushed.
    pub(super) async fn drain(&self) -> Result<(), Stopped> {
        poll_fn(|cx| {
            let mut state = self.lock()?;
            if state.broken {
                return Poll::Ready(Err(Stopped::Broken));
            }
            match drain(&mut state, cx) {
                Poll::Ready(Err(_)) => {
                    state.broken = true;
                    Poll::Ready(Err(Stopped::Broken))
                }
                Poll::Ready(Ok(())) => Poll::Ready(Ok(())),
                Poll::Pending => Poll::Pending,
            }
        })
        .await
    }

    /// Writes what is left and closes the stream.
    pub(super) async fn shutdown(&self) {
        let _ = poll_fn(|cx| {
            let Ok(mut state) = self.state.lock() else {
                return Poll::Ready(Ok(()));
            };
            if state.broken {
                return Poll::Ready(Ok(()));
            }
            // Closed under the same lock as the last drain: whatever a settle queued before is
            // written whole, and a settle after it writes nothing.
            state.closed = true;
            match drain(&mut state, cx) {
                Poll::Ready(Ok(())) => Pin::new(&mut state.half).poll_shutdown(cx),
                Poll::Ready(Err(e)) => {
                    state.broken = true;
                    Poll::Ready(Err(e))
                }
                Poll::Pending => Poll::Pending,
            }
        })
        .await;
    }

    /// Marks a telemetry append as handed to its partition (before the hand-over: it may settle
    /// at once).
    pub(super) fn begin_append(&self) {
        if let Ok(mut state) = self.state.lock() {
            state.appending = true;
        }
    }

    /// The append marked by [`Outlet::begin_append`] was refused before it was handed over.
    pub(super) fn cancel_append(&self) {
        if let Ok(mut state) = self.state.lock() {
            state.appending = false;
        }
    }

    /// Waits until this connection's telemetry append (if any) settled: Ok once acknowledged,
    /// the failure if it failed.
    pub(super) async fn wait_settled(&self) -> Result<(), Stopped> {
        poll_fn(|cx| {
            let mut state = self.lock()?;
            if let Some(e) = state.failed.take() {
                return Poll::Ready(Err(Stopped::AppendFailed(e)));
            }
            if state.appending {
                state.waiter = Some(cx.waker().clone());
                return Poll::Pending;
            }
            if state.broken {
                return Poll::Ready(Err(Stopped::Broken));
            }
            Poll::Ready(Ok(()))
        })
        .await
    }

    /// Ready when the connection must call [`Outlet::attend`].
    pub(super) async fn attention(&self) {
        poll_fn(|_| {
            if self.take_attention() {
                Poll::Ready(())
            } else {
                // Woken through `task` by whoever sets the flag.
                Poll::Pending
            }
        })
        .await
    }

    /// Whether a write failed (the device is gone).
    pub(super) fn is_broken(&self) -> bool {
        self.state.lock().map_or(true, |s| s.broken)
    }

    /// Takes the attention flag: true when [`Outlet::attend`] is due (checked between reads by a
    /// connection whose socket never lets its `select!` reach the attention arm).
    pub(super) fn take_attention(&self) -> bool {
        // Swapped, not stored: a ring between a load and a store would be lost.
        self.attention.load(Ordering::Acquire) && self.attention.swap(false, Ordering::AcqRel)
    }

    /// Finishes what a settle could not: reports a failed append or write, writes what is left.
    pub(super) async fn attend(&self) -> Result<(), Stopped> {
        {
            let mut state = self.lock()?;
            if let Some(e) = state.failed.take() {
                return Err(Stopped::AppendFailed(e));
            }
        }
        self.drain().await
    }
}

/// Writes `state.out` into the stream and flushes it.
fn drain<S: AsyncWrite>(state: &mut State<S>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
    while !state.out.is_empty() {
        match Pin::new(&mut state.half).poll_write(cx, &state.out) {
            Poll::Ready(Ok(0)) => return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into())),
            Poll::Ready(Ok(n)) => {
                state.out.advance(n);
                state.unflushed = true;
            }
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => return Poll::Pending,
        }
    }
    if state.out.capacity() > KEEP_BUFFER_BYTES {
        state.out = BytesMut::new();
    }
    if state.unflushed {
        match Pin::new(&mut state.half).poll_flush(cx) {
            Poll::Ready(Ok(())) => state.unflushed = false,
            other => return other,
        }
    }
    Poll::Ready(Ok(()))
}

impl<S: AsyncWrite + Send + 'static> Doorbell for Outlet<S> {
    /// Called after work was queued for the connection: the connection drains its queue when it
    /// next looks at the outlet.
    fn ring(&self) {
        self.mail.store(true, Ordering::Release);
        self.attention.store(true, Ordering::Release);
        self.task.wake_by_ref();
    }
}

impl<S: AsyncWrite + Send + 'static> AppendWatcher for Outlet<S> {
    /// Called by the task that settled the batch: writes the PUBACK (tag = packet id) if the
    /// append succeeded; whatever cannot finish here wakes the connection.
    fn settled(&self, tag: u64, result: Result<(), HubError>) {
        let Ok(mut state) = self.state.lock() else {
            return;
        };
        state.appending = false;
        let mut attention = false;
        match result {
            Ok(()) if tag != NO_PUBACK && state.writable() => {
                // PUBACK: fixed header, remaining length 2, packet id.
                let pkid = u16::try_from(tag).unwrap_or_default().to_be_bytes();
                state.out.extend_from_slice(&[0x40, 0x02, pkid[0], pkid[1]]);
            }
            Ok(()) => {}
            Err(e) => {
                state.failed = Some(e);
                attention = true;
            }
        }
        // Whatever is left from before goes too (a QoS 0 settle included): a device streaming
        // fast keeps the connection reading, and bytes left here would wait for it to pause.
        if state.writable() && (!state.out.is_empty() || state.unflushed) {
            match drain(&mut state, &mut Context::from_waker(&self.task)) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(_)) => {
                    state.broken = true;
                    attention = true;
                }
                Poll::Pending => attention = true,
            }
        }
        let waiter = state.waiter.take();
        drop(state);
        if attention {
            self.attention.store(true, Ordering::Release);
            self.task.wake_by_ref();
        }
        if let Some(waiter) = waiter {
            waiter.wake();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rumqttc::mqttbytes::v4::PubAck;
    use tokio::io::AsyncReadExt;

    type Duplex = tokio::io::DuplexStream;

    /// An outlet over one end of a pipe with `room` bytes of buffer (polled with this test's
    /// task waker), the device's end, and the connection's read half (kept open).
    async fn outlet(room: usize) -> (Outlet<Duplex>, Duplex, tokio::io::ReadHalf<Duplex>) {
        let (ours, device) = tokio::io::duplex(room);
        let (outlet, read) = over(ours).await;
        (outlet, device, read)
    }

    /// An outlet writing to `stream` (polled with this test's task waker) and the stream's read
    /// half, kept open.
    async fn over<S: tokio::io::AsyncRead + AsyncWrite>(
        stream: S,
    ) -> (Outlet<S>, tokio::io::ReadHalf<S>) {
        let (read, half) = tokio::io::split(stream);
        let task = poll_fn(|cx| Poll::Ready(cx.waker().clone())).await;
        (Outlet::new(half, task), read)
    }

    /// `f`, failing the test instead of hanging when it never finishes.
    async fn bounded<T>(f: impl std::future::Future<Output = T>) -> T {
        tokio::time::timeout(std::time::Duration::from_secs(5), f)
            .await
            .expect("finishes within 5 s")
    }

    #[tokio::test]
    async fn a_settled_append_writes_its_puback_in_order_after_earlier_packets() {
        let (outlet, mut device, _read) = outlet(1024).await;
        outlet.send(Packet::PingResp).await.expect("sent");
        outlet.begin_append();
        AppendWatcher::settled(&outlet, 7, Ok(()));
        outlet.begin_append();
        AppendWatcher::settled(&outlet, NO_PUBACK, Ok(()));
        bounded(outlet.wait_settled()).await.expect("settled");
        assert!(!outlet.attention.load(Ordering::Acquire));
        let mut bytes = [0u8; 6];
        bounded(device.read_exact(&mut bytes)).await.expect("read");
        assert_eq!(bytes, [0xd0, 0x00, 0x40, 0x02, 0x00, 0x07]);
        let mut buf = BytesMut::from(&bytes[2..]);
        assert_eq!(
            Packet::read(&mut buf, 16).expect("a packet"),
            Packet::PubAck(PubAck::new(7))
        );
    }

    #[tokio::test]
    async fn a_failed_append_is_not_acknowledged_and_stops_the_connection() {
        let (outlet, mut device, _read) = outlet(1024).await;
        outlet.begin_append();
        AppendWatcher::settled(
            &outlet,
            9,
            Err(HubError::new(
                meridian_proto::ErrorCode::ServiceUnavailable,
                "no quorum",
            )),
        );
        assert!(
            outlet.attention.load(Ordering::Acquire),
            "the connection is woken"
        );
        assert!(matches!(
            bounded(outlet.wait_settled()).await,
            Err(Stopped::AppendFailed(e)) if e.message == "no quorum"
        ));
        bounded(outlet.shutdown()).await;
        let mut rest = Vec::new();
        bounded(device.read_to_end(&mut rest)).await.expect("read");
        assert!(rest.is_empty(), "nothing was acknowledged: {rest:?}");
    }

    #[tokio::test]
    async fn a_puback_the_socket_cannot_take_at_once_is_finished_by_the_connection() {
        // Two bytes of room: the settle writes half the PUBACK and leaves the rest.
        let (outlet, mut device, _read) = outlet(2).await;
        outlet.begin_append();
        AppendWatcher::settled(&outlet, 0x0102, Ok(()));
        // The connection is asked to finish the write.
        bounded(outlet.attention()).await;
        let mut first = [0u8; 2];
        bounded(device.read_exact(&mut first)).await.expect("read");
        bounded(outlet.attend()).await.expect("the rest is written");
        let mut second = [0u8; 2];
        bounded(device.read_exact(&mut second)).await.expect("read");
        assert_eq!([first, second].concat(), [0x40, 0x02, 0x01, 0x02]);
        bounded(outlet.wait_settled()).await.expect("settled");
    }

    #[tokio::test]
    async fn a_later_settle_writes_what_an_earlier_one_left_even_without_a_puback() {
        let (outlet, mut device, _read) = outlet(2).await;
        outlet.begin_append();
        AppendWatcher::settled(&outlet, 0x0102, Ok(()));
        let mut first = [0u8; 2];
        bounded(device.read_exact(&mut first)).await.expect("read");
        // A QoS 0 message settles next: the rest of the PUBACK goes out with it, although the
        // connection (busy reading) has not attended to the outlet.
        outlet.begin_append();
        AppendWatcher::settled(&outlet, NO_PUBACK, Ok(()));
        let mut second = [0u8; 2];
        bounded(device.read_exact(&mut second)).await.expect("read");
        assert_eq!([first, second].concat(), [0x40, 0x02, 0x01, 0x02]);
    }

    /// A stream that records what is written into it, also after its shutdown (which it
    /// records as `EOF`), as a stream that does not refuse late writes would take them.
    #[derive(Clone, Default)]
    struct Recorder(std::sync::Arc<Mutex<Vec<u8>>>);

    const EOF: &[u8] = b"<eof>";

    impl tokio::io::AsyncRead for Recorder {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &mut tokio::io::ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            Poll::Pending
        }
    }

    impl AsyncWrite for Recorder {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            match self.0.lock() {
                Ok(mut bytes) => bytes.extend_from_slice(buf),
                Err(_) => return Poll::Ready(Err(std::io::ErrorKind::Other.into())),
            }
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            self.poll_write(cx, EOF).map_ok(|_| ())
        }
    }

    #[tokio::test]
    async fn an_append_settling_after_the_close_writes_nothing_after_the_end_of_the_stream() {
        let recorder = Recorder::default();
        let (outlet, _read) = over(recorder.clone()).await;
        outlet.send(Packet::PingResp).await.expect("sent");
        // The close gave up waiting for this append; it settles after the stream ended.
        outlet.begin_append();
        bounded(outlet.shutdown()).await;
        AppendWatcher::settled(&outlet, 7, Ok(()));
        assert!(outlet.send(Packet::PingResp).await.is_err(), "closed");
        bounded(outlet.wait_settled()).await.expect("settled");
        let written = recorder.0.lock().map(|b| b.clone()).unwrap_or_default();
        assert_eq!(
            written,
            [&[0xd0, 0x00][..], EOF].concat(),
            "only what was sent before the close"
        );
    }
}
