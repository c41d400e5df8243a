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

/// `finprint serve` on a free loopback port over an empty catalogue, zero-shot at 128 px; killed
/// when dropped.
struct Server {
    child: std::process::Child,
    addr: SocketAddr,
    _tmp: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    fn start() -> Option<Server> {
        let weights = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("weights/efficientnet_lite0.safetensors");
        if !weights.is_file() {
            eprintln!("skipped: {} is missing", weights.display());
            return None;
        }
        let tmp = tempfile::tempdir().unwrap();
        let mut child = common::finprint()
            .args([
                "serve",
                "--zero-shot",
                "efficientnet_lite0",
                "--img-size",
                "128",
            ])
            .args(["--addr", "127.0.0.1:0", "--token", TOKEN, "--threads", "2"])
            .arg("--catalog")
            .arg(tmp.path().join("cat"))
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                let _ = tx.send(line);
            }
        });
        let mut server = Server {
            child,
            addr: "127.0.0.1:1".parse().unwrap(),
            _tmp: tmp,
        };
        let deadline = Instant::now() + Duration::from_secs(300);
        while let Ok(line) = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            if let Some(rest) = line.split("serving on http://").nth(1) {
                server.addr = rest.split('/').next().unwrap().parse().unwrap();
                return Some(server);
            }
        }
        panic!("the server did not start");
    }

    /// The largest resident memory the server has used, in bytes.
    fn peak_memory(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
        let kb: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
        kb * 1024
    }

    /// POST a photo to /api/identify with the token; the status and the body.
    fn identify(&self, file: &str, photo: &[u8]) -> (u16, serde_json::Value) {
        let boundary = "probe-boundary-x7Qm";
        let mut body = format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"photo\"; filename=\"{file}\"\r\n\
             Content-Type: application/octet-stream\r\n\r\n"
        )
        .into_bytes();
        body.extend_from_slice(photo);
        body.extend(format!("\r\n--{boundary}--\r\n").as_bytes());
        let head = format!(
            "POST /api/identify HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
             Authorization: Bearer {TOKEN}\r\nContent-Length: {}\r\n\
             Content-Type: multipart/form-data; boundary={boundary}\r\n\r\n",
            body.len()
        );
        let mut s = TcpStream::connect(self.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
        s.write_all(&[head.as_bytes(), &body].concat()).unwrap();
        let mut answer = Vec::new();
        s.read_to_end(&mut answer).unwrap();
        let answer = String::from_utf8_lossy(&answer);
        let status = answer[9..12].parse().unwrap();
        let json = answer.split("\r\n\r\n").nth(1).unwrap_or("");
        (
            status,
            serde_json::from_str(json).unwrap_or(serde_json::Value::Null),
        )
    }
}

/// A 160×120 JPEG photo.
fn photo() -> Vec<u8> {
    let rgb: Vec<u8> = (0..160 * 120)
        .flat_map(|i: u32| [(i % 160) as u8, (i / 160) as u8 * 2, 90])
        .collect();
    let mut bytes = Vec::new();
    jpeg_encoder::Encoder::new(&mut bytes, 90)
        .encode(&rgb, 160, 120, jpeg_encoder::ColorType::Rgb)
        .unwrap();
    bytes
}

/// A JPEG of a few hundred bytes whose header declares 16000×16000 px is refused from its
/// header, fast and without the gigabyte its pixels would take; so are two at once.
#[test]
fn an_image_bomb_is_refused_without_its_memory() {
    let Some(server) = Server::start() else {
        return;
    };
    let bomb = common::header_bomb(16000);
    assert!(bomb.len() < 1000);
    let started = Instant::now();
    std::thread::scope(|scope| {
        let answers: Vec<_> = (0..2)
            .map(|i| {
                let (server, bomb) = (&server, &bomb);
                scope.spawn(move || server.identify(&format!("bomb{i}.jpg"), bomb))
            })
            .collect();
        for (i, a) in answers.into_iter().enumerate() {
            let (status, body) = a.join().unwrap();
            assert_eq!(status, 400, "{body}");
            let error = body["error"].as_str().unwrap();
            assert!(
                error.starts_with(&format!("bomb{i}.jpg")) && error.contains("limit"),
                "{error}"
            );
        }
    });
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    let peak = server.peak_memory();
    eprintln!(
        "server peak memory after two bombs: {} MB",
        peak / 1_000_000
    );
    assert!(
        peak < 1_000_000_000,
        "the server reached {} MB",
        peak / 1_000_000
    );
}

/// 40 uploads of one photo at once: every one answered 200, one photo kept.
#[test]
fn racing_uploads_of_one_photo_all_succeed() {
    let Some(server) = Server::start() else {
        return;
    };
    let photo = photo();
    let answers: Vec<(u16, serde_json::Value)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..40)
            .map(|_| scope.spawn(|| server.identify("same.jpg", &photo)))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (status, body) in &answers {
        assert_eq!(*status, 200, "{body}");
    }
    let images: std::collections::BTreeSet<&str> = answers
        .iter()
        .map(|(_, b)| b["image"].as_str().unwrap())
        .collect();
    assert_eq!(images.len(), 1, "{images:?}");
    let kept = std::fs::read_dir(server._tmp.path().join("cat/images"))
        .unwrap()
        .count();
    assert_eq!(kept, 1, "one file, no temporary left");
}
