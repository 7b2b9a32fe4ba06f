//! The answering side of the peer protocol: one task per accepted peer
//! connection reads frames, checks the handshake through the
//! [`PeerHandler`], then handles each request in its own task (bounded by
//! [`PEER_IN_FLIGHT_MAX`]) and writes the answers as they complete.

use std::sync::Arc;

use futures::future::BoxFuture;
use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, Semaphore};
use tokio_util::codec::{FramedRead, FramedWrite};

use super::{
    codec, decode, encode, Frame, PeerHello, PeerRequest, PeerResponse, PeerWelcome,
    PEER_IN_FLIGHT_MAX,
};

/// What the server does with peer requests.
pub trait PeerHandler: Send + Sync + 'static {
    /// Check a handshake; `Err` is the reason to refuse it.
    fn hello(&self, hello: &PeerHello) -> Result<PeerWelcome, String>;

    /// Answer one request of a peer whose handshake was `hello`.
    fn handle(
        self: Arc<Self>,
        hello: Arc<PeerHello>,
        req: PeerRequest,
    ) -> BoxFuture<'static, PeerResponse>;
}

/// Serve one peer connection (TLS done, server role checked) until it
/// closes or breaks the protocol.
pub async fn serve<S, H>(stream: S, handler: Arc<H>, peer: String)
where
    S: AsyncRead + AsyncWrite + Send + 'static,
    H: PeerHandler,
{
    let (rd, wr) = tokio::io::split(stream);
    let mut reader = FramedRead::new(rd, codec());
    let mut writer = FramedWrite::new(wr, codec());
    let send = |id: u64, body: PeerResponse| encode(&Frame { id, body });

    // The handshake.
    let hello = match reader.next().await {
        Some(Ok(bytes)) => match decode::<PeerRequest>(&bytes) {
            Ok(Frame {
                body: PeerRequest::Hello(h),
                ..
            }) => h,
            Ok(_) => {
                tracing::info!(peer, "peer connection without a handshake first: closed");
                return;
            }
            Err(e) => {
                tracing::info!(peer, "undecodable peer handshake: {e}");
                return;
            }
        },
        Some(Err(e)) => {
            tracing::debug!(peer, "peer connection failed before the handshake: {e}");
            return;
        }
        None => return,
    };
    let answer = match handler.hello(&hello) {
        Ok(w) => PeerResponse::Welcome(w),
        Err(reason) => {
            tracing::warn!(peer, from = hello.from, "refused a peer: {reason}");
            PeerResponse::Refused(reason)
        }
    };
    let refused = matches!(answer, PeerResponse::Refused(_));
    match send(0, answer) {
        Ok(b) => {
            if writer.send(b).await.is_err() {
                return;
            }
        }
        Err(e) => {
            tracing::warn!(peer, "cannot encode the handshake answer: {e}");
            return;
        }
    }
    if refused {
        let _ = SinkExt::<bytes::Bytes>::close(&mut writer).await;
        return;
    }
    let hello = Arc::new(hello);

    // Requests, each in its own task; answers through one writer.
    let (tx, mut rx) = mpsc::channel::<(u64, PeerResponse)>(PEER_IN_FLIGHT_MAX);
    let wpeer = peer.clone();
    let writer_task = tokio::spawn(async move {
        while let Some((id, body)) = rx.recv().await {
            match send(id, body) {
                Ok(b) => {
                    if let Err(e) = writer.feed(b).await {
                        tracing::debug!(peer = wpeer, "peer write failed: {e}");
                        return;
                    }
                }
                Err(e) => tracing::warn!(peer = wpeer, "cannot encode a peer answer: {e}"),
            }
            if rx.is_empty() && SinkExt::<bytes::Bytes>::flush(&mut writer).await.is_err() {
                return;
            }
        }
    });
    let slots = Arc::new(Semaphore::new(PEER_IN_FLIGHT_MAX));
    // A refused request ends the connection (after its answer is queued).
    let refused = Arc::new(tokio::sync::Notify::new());
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        let next = tokio::select! {
            n = reader.next() => n,
            () = refused.notified() => break,
        };
        let Some(next) = next else { break };
        while tasks.try_join_next().is_some() {}
        let bytes = match next {
            Ok(b) => b,
            Err(e) => {
                tracing::debug!(peer, "peer connection ended: {e}");
                break;
            }
        };
        let frame: Frame<PeerRequest> = match decode(&bytes) {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(peer, "undecodable peer request: {e}; closing");
                break;
            }
        };
        if matches!(frame.body, PeerRequest::Hello(_)) {
            let _ = tx
                .send((frame.id, PeerResponse::Refused("second handshake".into())))
                .await;
            break;
        }
        let Ok(permit) = slots.clone().acquire_owned().await else {
            break;
        };
        let (h, hello, tx, refused) = (handler.clone(), hello.clone(), tx.clone(), refused.clone());
        tasks.spawn(async move {
            let resp = h.handle(hello, frame.body).await;
            let end = matches!(resp, PeerResponse::Refused(_));
            let _ = tx.send((frame.id, resp)).await;
            if end {
                refused.notify_one();
            }
            drop(permit);
        });
    }
    tasks.abort_all();
    drop(tx);
    let _ = writer_task.await;
    tracing::debug!(peer, "peer connection closed");
}
