//! The service probed as a hostile but fair client would probe it, over real TCP on the
//! loopback: slow clients are cut off, an image bomb is refused without the memory it asks
//! for, and racing uploads of one photo all succeed.

mod common;

use finprint::catalog::Catalog;
use finprint::service::{serve, AppState, Timeouts};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

const TOKEN: &str = "probe-token";

/// A server over an empty catalogue (no model: enough for what is probed here) on a free
/// loopback port; it stops when the returned sender is dropped.
async fn start(
    timeouts: Timeouts,
) -> (
    SocketAddr,
    tempfile::TempDir,
    tokio::sync::oneshot::Sender<()>,
) {
    let tmp = tempfile::tempdir().unwrap();
    let catalog = Catalog::open(&tmp.path().join("cat")).unwrap();
    let state = AppState::new(Arc::new(catalog), TOKEN.into(), 1_000_000);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(serve(state, listener, timeouts, async {
        let _ = stopped.await;
    }));
    (addr, tmp, stop)
}

/// Send `parts` with `pause` after each, then read until the server closes the connection
/// (at most `limit`). Returns what came back and how long after the last part it closed.
fn converse(
    addr: SocketAddr,
    parts: &[&[u8]],
    pause: Duration,
    limit: Duration,
) -> (String, Duration) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(limit)).unwrap();
    for p in parts {
        // The server may already have closed: the rest is then refused, as it should be.
        if s.write_all(p).is_err() {
            break;
        }
        std::thread::sleep(pause);
    }
    let sent = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("the server kept the connection open for {limit:?}: {e}"),
        }
    }
    (String::from_utf8_lossy(&got).into_owned(), sent.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_are_cut_off() {
    let timeouts = Timeouts {
        header: Duration::from_millis(800),
        body: Duration::from_millis(1500),
        idle: Duration::from_millis(1000),
    };
    let (addr, _tmp, _stop) = start(timeouts).await;
    let limit = Duration::from_secs(10);
    let checks = tokio::task::spawn_blocking(move || {
        // Half the headers, then nothing: closed by the header timeout.
        let (_, after) = converse(
            addr,
            &[b"GET /api/health HTTP/1.1\r\nHost: x\r\n"],
            Duration::ZERO,
            limit,
        );
        assert!(
            after < Duration::from_secs(3),
            "half headers held {after:?}"
        );

        // Headers a byte at a time, never finished: the header timeout holds however the
        // client trickles.
        let trickle: Vec<&[u8]> = b"GET /api/health HTTP/1.1\r\nHost: x\r\nX-Slow: "
            .chunks(1)
            .collect();
        let started = Instant::now();
        converse(addr, &trickle, Duration::from_millis(50), limit);
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "trickled headers held {:?}",
            started.elapsed()
        );

        // Headers whole, half the body, then silence: closed by the idle timeout.
        let head = format!(
            "POST /api/decisions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n\
             Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
        );
        let (_, after) = converse(
            addr,
            &[head.as_bytes(), &[b' '; 500]],
            Duration::ZERO,
            limit,
        );
        assert!(after < Duration::from_secs(3), "half a body held {after:?}");

        // A body trickled a few bytes at a time, never idle: 408 as JSON after the body timeout.
        let mut parts: Vec<&[u8]> = vec![head.as_bytes()];
        parts.extend(std::iter::repeat_n(b"    ".as_slice(), 12));
        let started = Instant::now();
        let (answer, _) = converse(addr, &parts, Duration::from_millis(250), limit);
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
        assert!(
            answer.contains("\"error\"") && answer.contains("body"),
            "{answer}"
        );
        assert!(started.elapsed() < Duration::from_secs(5));

        // A kept-alive connection without a next request: answered, then closed when idle.
        let (answer, after) = converse(
            addr,
            &[b"GET /api/health HTTP/1.1\r\nHost: x\r\n\r\n"],
            Duration::ZERO,
            limit,
        );
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(
            after < Duration::from_secs(3),
            "idle connection held {after:?}"
        );
    });
    tokio::time::timeout(Duration::from_secs(60), checks)
        .await
        .expect("the checks finish")
        .unwrap();
}
