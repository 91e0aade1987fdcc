//! One HTTP/1.1 connection, served a request at a time: this module reads each request's head
//! itself, into a buffer the size of what arrived, and builds a hyper connection for that one
//! request only — so a connection between requests, or still sending its head, holds no hyper
//! state.
//!
//! Why: hyper allocates an 8 KiB write buffer when a connection is built and an 8 KiB read
//! buffer at its first read, and keeps both for the connection's life, idle keep-alive time
//! included; neither size is configurable. 2,000 connections idle after a request, or sending
//! half a header, cost 26–32 MiB that way (benchmark g′). Here such a connection costs its
//! task and the bytes it sent.
//!
//! How a request is served:
//! 1. Wait for its first byte (read into the stack: nothing is allocated before it), within
//!    [`HEADER_READ_TIMEOUT`] — of connecting, or of the end of the previous response.
//! 2. Read the head (`httparse`) within [`HEADER_READ_TIMEOUT`] of that byte.
//! 3. Hand hyper an I/O that yields exactly the request (head, then a `Content-Length` body
//!    from the socket) and nothing after it: bytes of a next, pipelined request stay here.
//! 4. When the response body has ended, shut that hyper connection down gracefully (it
//!    finishes writing first) and go back to 1 — unless the request, the response or hyper
//!    asked to close, or the request's body was not read to its end.
//!
//! A head this module does not take apart — malformed, over [`MAX_HEAD`], a chunked or
//! otherwise framed body, an upgrade — goes to hyper with the rest of the connection, as it
//! came; hyper answers it (400, 431, …) or serves it as it always would.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::task::{Context, Poll, ready};

use axum::body::Body;
use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::HEADER_READ_TIMEOUT;

/// The longest head read here; a longer one goes to hyper, which answers 431 past its own
/// limit. Real heads (probes, browsers, the API's clients) are well under 8 KiB.
pub const MAX_HEAD: usize = 16 * 1024;

/// Headers a head read here may have (hyper's default limit too).
const MAX_HEADERS: usize = 100;

/// How much of the socket is read at a time while a head arrives, into the stack: the
/// connection keeps only what arrived, so half a header costs what was sent.
const HEAD_READ_CHUNK: usize = 2048;

/// Counts a hyper connection in `live` for as long as it lives.
struct Alive(Arc<AtomicI64>);

impl Alive {
    fn new(live: &Arc<AtomicI64>) -> Alive {
        live.fetch_add(1, Ordering::Relaxed);
        Alive(live.clone())
    }
}

impl Drop for Alive {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The application as hyper calls it: a request in, a response out.
pub type App = axum::Router;

/// What a connection needs besides its socket.
pub struct Setup {
    /// The router, with the peer's address added to each request.
    pub app: App,
    /// The client's address.
    pub peer: std::net::SocketAddr,
    /// hyper's settings for each request's connection.
    pub builder: Arc<hyper::server::conn::http1::Builder>,
    /// Set once a whole request head has arrived: the connection cap makes room by aborting
    /// the task of a connection that never sent one, so a served connection is never cut.
    pub served: Arc<AtomicBool>,
    /// The server is stopping: idle connections close, a request in flight finishes.
    pub shutdown: CancellationToken,
    /// hyper connections alive now, of every connection this counter is given to: a
    /// connection between requests holds none (the tests watch it).
    pub hyper_live: Arc<AtomicI64>,
}

/// How a request's end is known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// The head ends at `head` bytes and `body` bytes follow it.
    Known {
        head: usize,
        body: u64,
        keep_alive: bool,
    },
    /// Anything else: hyper takes the connection from here.
    Handover,
}

/// Serves a connection until it closes.
pub async fn serve(mut stream: TcpStream, cx: Setup) {
    // Bytes read but not yet served: a head as it arrives, or a pipelined request.
    let mut pending: Vec<u8> = Vec::new();
    loop {
        if pending.is_empty() {
            // A waiting connection holds no buffer, and its task is small: 2,000 of them
            // are most of what an idle flood costs (benchmark g′).
            pending = Vec::new();
            let first = tokio::select! {
                r = tokio::time::timeout(HEADER_READ_TIMEOUT, first_byte(&stream)) => r.ok().and_then(Result::ok).flatten(),
                () = cx.shutdown.cancelled() => None,
            };
            let Some(byte) = first else {
                return;
            };
            pending.push(byte);
        }
        let framing = tokio::select! {
            r = tokio::time::timeout(HEADER_READ_TIMEOUT, read_head(&mut stream, &mut pending)) => match r {
                Ok(Ok(f)) => f,
                // The client closed or failed mid-head, or took too long: as hyper's header
                // timeout does, close without an answer.
                Ok(Err(_)) | Err(_) => return,
            },
            () = cx.shutdown.cancelled() => return,
        };
        let Framing::Known {
            head,
            body,
            keep_alive,
        } = framing
        else {
            cx.served.store(true, Ordering::Relaxed);
            handover(stream, pending, &cx).await;
            return;
        };
        cx.served.store(true, Ordering::Relaxed);
        let outcome = one_request(&mut stream, &mut pending, head, body, &cx).await;
        if !(keep_alive && outcome.reusable) {
            return;
        }
    }
}

/// Waits for a connection's first byte and reads it; `None`: the client closed first.
///
/// `readable()` and a one-byte read into the stack, not `peek`: the same effect (nothing
/// allocated until a byte is there — readiness may be reported with none) in a smaller
/// future (176 bytes against `peek`'s 232, in every waiting task). A readiness with no byte
/// is cleared by the read's `WouldBlock`. Kept apart from [`read_head`]'s reads on purpose:
/// one helper for both (a chunk read appended to `pending`) made the waiting task 40 bytes
/// bigger.
async fn first_byte(stream: &TcpStream) -> io::Result<Option<u8>> {
    loop {
        stream.readable().await?;
        let mut byte = [0u8; 1];
        match stream.try_read(&mut byte) {
            Ok(0) => return Ok(None),
            Ok(_) => return Ok(Some(byte[0])),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
}

/// Reads until `pending` holds a whole head; says how the request is framed.
async fn read_head(stream: &mut TcpStream, pending: &mut Vec<u8>) -> io::Result<Framing> {
    loop {
        match framing(pending) {
            Some(f) => return Ok(f),
            None if pending.len() >= MAX_HEAD => return Ok(Framing::Handover),
            None => {}
        }
        stream.readable().await?;
        // Not kept across an await: the waiting task does not carry it.
        let mut chunk = [0u8; HEAD_READ_CHUNK];
        match stream.try_read(&mut chunk) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => pending.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
}

/// The framing of the head at the start of `buf`; `None` while it is incomplete.
fn framing(buf: &[u8]) -> Option<Framing> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return None,
        // Malformed, or too many headers: hyper says so properly.
        Err(_) => return Some(Framing::Handover),
    };
    let mut body = 0u64;
    let mut lengths = 0;
    // HTTP/1.1 keeps the connection unless told to close; 1.0 closes unless told to keep it.
    let mut keep_alive = req.version == Some(1);
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            lengths += 1;
            match std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse().ok())
            {
                Some(n) => body = n,
                None => return Some(Framing::Handover),
            }
        } else if h.name.eq_ignore_ascii_case("transfer-encoding")
            || h.name.eq_ignore_ascii_case("upgrade")
        {
            return Some(Framing::Handover);
        } else if h.name.eq_ignore_ascii_case("connection") {
            for token in h.value.split(|b| *b == b',') {
                let token = token.trim_ascii();
                if token.eq_ignore_ascii_case(b"close") {
                    keep_alive = false;
                } else if token.eq_ignore_ascii_case(b"keep-alive") {
                    keep_alive = true;
                }
            }
        }
    }
    // Two lengths (even equal ones): let hyper judge the request.
    if lengths > 1 {
        return Some(Framing::Handover);
    }
    Some(Framing::Known {
        head,
        body,
        keep_alive,
    })
}

/// How a request's connection ended.
struct Outcome {
    /// The request was read to its end and the response sent whole; the socket is at the
    /// next request.
    reusable: bool,
}

/// Serves one request whose head is at the start of `pending` through its own hyper
/// connection.
async fn one_request(
    stream: &mut TcpStream,
    pending: &mut Vec<u8>,
    head: usize,
    body: u64,
    cx: &Setup,
) -> Outcome {
    let ended = Arc::new(Notify::new());
    let close_asked = Arc::new(AtomicBool::new(false));
    let svc = service(cx, Some((ended.clone(), close_asked.clone())));
    let mut left = head as u64 + body;
    let io = OneRequest {
        stream,
        pending,
        taken: 0,
        left: &mut left,
    };
    let alive = Alive::new(&cx.hyper_live);
    // Boxed: the task waiting for a connection's next request stays small.
    let mut conn = Box::pin(
        cx.builder
            .serve_connection(hyper_util::rt::TokioIo::new(io), svc),
    );
    let mut ended_seen = false;
    let mut stopping = false;
    let result = loop {
        tokio::select! {
            r = conn.as_mut() => break r,
            () = ended.notified(), if !ended_seen => {
                // The response body has ended: hyper finishes writing it, then stops instead
                // of waiting for a next request (this loop reads that one itself).
                ended_seen = true;
                conn.as_mut().graceful_shutdown();
            }
            () = cx.shutdown.cancelled(), if !stopping => {
                stopping = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    };
    // hyper's connection and its buffers go now, before the wait for a next request.
    drop(conn);
    drop(alive);
    // An error is the client's (a reset, a body cut short): nothing to answer.
    let reusable = result.is_ok()
        && ended_seen
        && !stopping
        && !close_asked.load(Ordering::Relaxed)
        && left == 0;
    Outcome { reusable }
}

/// Hands the connection, with what was read of it, to hyper for the rest of its life.
async fn handover(stream: TcpStream, pending: Vec<u8>, cx: &Setup) {
    let svc = service(cx, None);
    // The socket with what was already read of it put back in front.
    let (read, write) = stream.into_split();
    let io = tokio::io::join(io::Cursor::new(pending).chain(read), write);
    let _alive = Alive::new(&cx.hyper_live);
    let mut conn = Box::pin(
        cx.builder
            .serve_connection(hyper_util::rt::TokioIo::new(io), svc),
    );
    let mut stopping = false;
    loop {
        tokio::select! {
            // Errors here are the client's (a reset, a header timeout): nothing to do.
            _ = conn.as_mut() => return,
            () = cx.shutdown.cancelled(), if !stopping => {
                stopping = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    }
}

/// The router as a hyper service: the peer's address added to each request; with `watch`,
/// the response body reports its end and whether the response asked to close.
fn service(
    cx: &Setup,
    watch: Option<(Arc<Notify>, Arc<AtomicBool>)>,
) -> impl hyper::service::Service<
    axum::http::Request<hyper::body::Incoming>,
    Response = axum::http::Response<Body>,
    Error = std::convert::Infallible,
    Future = impl Future<Output = Result<axum::http::Response<Body>, std::convert::Infallible>> + Send,
> + Clone {
    use tower::ServiceExt;
    let (app, peer) = (cx.app.clone(), cx.peer);
    hyper::service::service_fn(move |mut req: axum::http::Request<hyper::body::Incoming>| {
        req.extensions_mut()
            .insert(axum::extract::ConnectInfo(peer));
        let fut = app.clone().oneshot(req.map(Body::new));
        let watch = watch.clone();
        async move {
            let resp = fut.await?;
            let Some((ended, close_asked)) = watch else {
                return Ok(resp);
            };
            let closes = resp
                .headers()
                .get_all(axum::http::header::CONNECTION)
                .iter()
                .any(|v| {
                    v.as_bytes()
                        .split(|b| *b == b',')
                        .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"))
                });
            if closes {
                close_asked.store(true, Ordering::Relaxed);
            }
            Ok(resp.map(|b| Body::new(Watched { inner: b, ended })))
        }
    })
}

/// A response body that says when it has ended (or was dropped unsent: a `HEAD`, a 304).
struct Watched {
    inner: Body,
    ended: Arc<Notify>,
}

impl http_body::Body for Watched {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        let frame = ready!(Pin::new(&mut self.inner).poll_frame(cx));
        if frame.is_none() {
            self.ended.notify_one();
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        // hyper asks this instead of polling once more when a body knows it is done.
        let end = self.inner.is_end_stream();
        if end {
            self.ended.notify_one();
        }
        end
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        self.ended.notify_one();
    }
}

/// The I/O of one request's hyper connection: the request's bytes (from `pending`, then the
/// socket), then nothing — a next request is never read — while writes go to the socket.
struct OneRequest<'a> {
    stream: &'a mut TcpStream,
    pending: &'a mut Vec<u8>,
    /// Bytes of `pending` given to hyper (removed when the request is done).
    taken: usize,
    /// Bytes of the request not yet given to hyper.
    left: &'a mut u64,
}

impl Drop for OneRequest<'_> {
    fn drop(&mut self) {
        // What hyper took is gone; a pipelined request's bytes stay for the next round.
        self.pending.drain(..self.taken);
        self.taken = 0;
    }
}

impl AsyncRead for OneRequest<'_> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if *this.left == 0 {
            // The request is whole. A read now is hyper watching for the client leaving
            // while it answers (or, once idle, for a next request, which this connection
            // reads itself): report a close, never consume a byte.
            let mut probe = [0u8; 1];
            let mut probe = ReadBuf::new(&mut probe);
            return match ready!(this.stream.poll_peek(cx, &mut probe)) {
                Ok(0) => Poll::Ready(Ok(())),
                // A next request is waiting: leave it there, and wait for the response to
                // finish.
                Ok(_) => Poll::Pending,
                Err(e) => Poll::Ready(Err(e)),
            };
        }
        let room = buf
            .remaining()
            .min(usize::try_from(*this.left).unwrap_or(usize::MAX));
        let buffered = this.pending.len() - this.taken;
        if buffered > 0 {
            let n = buffered.min(room);
            buf.put_slice(&this.pending[this.taken..this.taken + n]);
            this.taken += n;
            *this.left -= n as u64;
            return Poll::Ready(Ok(()));
        }
        // At most the rest of the request: the socket may already hold the next one.
        let mut part = ReadBuf::new(buf.initialize_unfilled_to(room));
        ready!(Pin::new(&mut *this.stream).poll_read(cx, &mut part))?;
        let n = part.filled().len();
        buf.advance(n);
        *this.left -= n as u64;
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for OneRequest<'_> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.get_mut().stream).poll_write(cx, data)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // The socket outlives this request: flushing is all there is to do.
        Pin::new(&mut *self.get_mut().stream).poll_flush(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::eventually;
    use std::time::Duration;
    use tokio::io::AsyncWriteExt;

    /// A server on a free port with a few routes; its hyper-connection counter.
    async fn server() -> (std::net::SocketAddr, Arc<AtomicI64>, Arc<AtomicBool>) {
        let (addr, live, dropped, _) = server_stopping_on().await;
        (addr, live, dropped)
    }

    /// The same, and the token that stops it.
    async fn server_stopping_on() -> (
        std::net::SocketAddr,
        Arc<AtomicI64>,
        Arc<AtomicBool>,
        CancellationToken,
    ) {
        let dropped = Arc::new(AtomicBool::new(false));
        let on_drop = dropped.clone();
        let app = axum::Router::new()
            .route("/a", axum::routing::get(|| async { "a" }))
            .route("/b", axum::routing::get(|| async { "b" }))
            .route(
                "/echo",
                axum::routing::post(|body: String| async move { body }),
            )
            .route(
                "/forever",
                axum::routing::get(move || {
                    let on_drop = on_drop.clone();
                    async move {
                        // A body that never ends, and says when it is dropped.
                        struct Flag(Arc<AtomicBool>);
                        impl Drop for Flag {
                            fn drop(&mut self) {
                                self.0.store(true, Ordering::Relaxed);
                            }
                        }
                        let flag = Flag(on_drop);
                        let s = futures::stream::once(async {
                            Ok::<_, std::convert::Infallible>(Bytes::from_static(b"x"))
                        })
                        .chain(futures::stream::pending())
                        .map(move |b| {
                            let _keep = &flag;
                            b
                        });
                        Body::from_stream(s)
                    }
                }),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let live = Arc::new(AtomicI64::new(0));
        let counter = live.clone();
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder.timer(hyper_util::rt::TokioTimer::new());
        let builder = Arc::new(builder);
        tokio::spawn(async move {
            while let Ok((stream, peer)) = listener.accept().await {
                let setup = Setup {
                    app: app.clone(),
                    peer,
                    builder: builder.clone(),
                    served: Arc::new(AtomicBool::new(false)),
                    shutdown: stop.clone(),
                    hyper_live: counter.clone(),
                };
                tokio::spawn(serve(stream, setup));
            }
        });
        (addr, live, dropped, shutdown)
    }

    use futures::StreamExt;

    /// Reads one response (head and a `Content-Length` body); `None` at EOF.
    async fn response(s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<(String, String)> {
        loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).to_string();
                let len: usize = head
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length:")
                            .map(|v| v.trim().parse().unwrap_or(0))
                    })
                    .unwrap_or(0);
                if buf.len() >= end + 4 + len {
                    let body = String::from_utf8_lossy(&buf[end + 4..end + 4 + len]).to_string();
                    buf.drain(..end + 4 + len);
                    return Some((head, body));
                }
            }
            let mut chunk = [0u8; 4096];
            let n = s.read(&mut chunk).await.ok()?;
            if n == 0 {
                return None;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    }

    async fn zero(live: &Arc<AtomicI64>) {
        eventually(
            "no hyper connection alive",
            Duration::from_secs(5),
            || async {
                match live.load(Ordering::Relaxed) {
                    0 => Ok(()),
                    n => Err(format!("{n} alive")),
                }
            },
        )
        .await;
    }

    #[tokio::test]
    async fn a_keep_alive_connection_holds_no_hyper_connection_between_requests() {
        let (addr, live, _) = server().await;
        let mut s = TcpStream::connect(addr).await.expect("connect");
        let mut buf = vec![];
        for path in ["a", "b", "a"] {
            s.write_all(format!("GET /{path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
                .await
                .expect("write");
            let (head, body) = response(&mut s, &mut buf).await.expect("a response");
            assert!(head.starts_with("HTTP/1.1 200"), "{head}");
            assert!(
                !head.to_ascii_lowercase().contains("connection: close"),
                "{head}"
            );
            assert_eq!(body, path);
            // Answered, and the socket still open: hyper's connection is gone all the same.
            zero(&live).await;
        }
    }

    #[tokio::test]
    async fn pipelined_requests_and_a_body_are_answered_in_order_on_one_connection() {
        let (addr, live, _) = server().await;
        let mut s = TcpStream::connect(addr).await.expect("connect");
        // Three requests in one write: the first request's hyper connection must not read
        // the others.
        s.write_all(
            b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nPOST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhelloGET /b HTTP/1.1\r\nHost: x\r\n\r\n",
        )
        .await
        .expect("write");
        let mut buf = vec![];
        let mut bodies = vec![];
        for _ in 0..3 {
            let (head, body) = response(&mut s, &mut buf).await.expect("a response");
            assert!(head.starts_with("HTTP/1.1 200"), "{head}");
            bodies.push(body);
        }
        assert_eq!(bodies, ["a", "hello", "b"]);
        zero(&live).await;
    }

    #[tokio::test]
    async fn a_body_sent_after_the_head_is_read_and_the_connection_kept() {
        let (addr, _, _) = server().await;
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\n\r\nhello")
            .await
            .expect("write");
        tokio::task::yield_now().await;
        s.write_all(b" world").await.expect("write");
        let mut buf = vec![];
        let (_, body) = response(&mut s, &mut buf).await.expect("a response");
        assert_eq!(body, "hello world");
        s.write_all(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("write");
        assert_eq!(response(&mut s, &mut buf).await.expect("a response").1, "a");
    }

    #[tokio::test]
    async fn a_chunked_body_goes_to_hyper_with_the_rest_of_the_connection() {
        let (addr, _, _) = server().await;
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(
            b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\n\r\n",
        )
        .await
        .expect("write");
        let mut buf = vec![];
        assert_eq!(response(&mut s, &mut buf).await.expect("first").1, "hello");
        assert_eq!(response(&mut s, &mut buf).await.expect("second").1, "b");
    }

    #[tokio::test]
    async fn close_is_honoured_and_a_malformed_head_gets_hypers_400() {
        let (addr, _, _) = server().await;
        for req in [
            &b"GET /a HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"[..],
            &b"GET /a HTTP/1.0\r\n\r\n"[..],
        ] {
            let mut s = TcpStream::connect(addr).await.expect("connect");
            s.write_all(req).await.expect("write");
            let mut buf = vec![];
            let (head, body) = response(&mut s, &mut buf).await.expect("a response");
            assert!(head.contains(" 200 "), "{head}");
            assert_eq!(body, "a");
            assert!(
                response(&mut s, &mut buf).await.is_none(),
                "then the server closes"
            );
        }
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(b"GET /a HTTP/1.1\r\nHost x\r\n\r\n")
            .await
            .expect("write");
        let mut buf = vec![];
        let (head, _) = response(&mut s, &mut buf).await.expect("a response");
        assert!(head.starts_with("HTTP/1.1 400"), "{head}");
    }

    #[tokio::test]
    async fn a_client_leaving_an_endless_response_ends_it() {
        let (addr, live, dropped) = server().await;
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(b"GET /forever HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("write");
        let mut first = [0u8; 64];
        assert!(s.read(&mut first).await.expect("read") > 0);
        assert_eq!(live.load(Ordering::Relaxed), 1, "being served");
        drop(s);
        eventually(
            "the endless body dropped",
            Duration::from_secs(5),
            || async {
                if dropped.load(Ordering::Relaxed) {
                    Ok(())
                } else {
                    Err("still streaming".to_string())
                }
            },
        )
        .await;
        zero(&live).await;
    }

    #[tokio::test]
    async fn at_shutdown_a_connection_between_requests_is_closed() {
        let (addr, live, _, shutdown) = server_stopping_on().await;
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("write");
        let mut buf = vec![];
        assert_eq!(response(&mut s, &mut buf).await.expect("a response").1, "a");
        zero(&live).await;
        shutdown.cancel();
        // The server closes it: the client reads the end of the stream, not a timeout.
        let end = tokio::time::timeout(Duration::from_secs(5), response(&mut s, &mut buf)).await;
        assert!(matches!(end, Ok(None)), "closed at shutdown");
    }
}
