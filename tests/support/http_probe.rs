//! Raw HTTP/1.1 GETs with a deadline and their latency, and held (slowloris) connections:
//! for tests of a server under connection floods, where every request must be a fresh
//! connection and a hung one must fail the test rather than hang it.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// GET `path` on a new connection; the status, the body and how long the whole exchange took.
pub fn get(
    addr: SocketAddr,
    path: &str,
    deadline: Duration,
) -> Result<(u16, String, Duration), String> {
    let started = Instant::now();
    let mut stream =
        TcpStream::connect_timeout(&addr, deadline).map_err(|e| format!("connect: {e}"))?;
    stream
        .set_read_timeout(Some(deadline))
        .and_then(|()| stream.set_write_timeout(Some(deadline)))
        .map_err(|e| format!("timeouts: {e}"))?;
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .map_err(|e| format!("send: {e}"))?;
    let mut reply = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        if started.elapsed() > deadline {
            return Err(format!("no complete reply to {path} within {deadline:?}"));
        }
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => reply.extend_from_slice(&chunk[..n]),
            Err(e) => return Err(format!("read {path}: {e}")),
        }
    }
    let elapsed = started.elapsed();
    let text = String::from_utf8_lossy(&reply).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("no status line in {text:?}"))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .unwrap_or_default();
    Ok((status, body, elapsed))
}

/// Connections that send part of a request head and never finish it.
pub struct HeldConnections {
    streams: Vec<Option<TcpStream>>,
}

impl HeldConnections {
    /// Open `count` connections to `addr`, each sending the start of a request head.
    pub fn open(addr: SocketAddr, count: usize) -> HeldConnections {
        let mut streams = Vec::with_capacity(count);
        for n in 0..count {
            let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
                .unwrap_or_else(|e| panic!("connection {n}: {e}"));
            stream.set_nonblocking(true).expect("non-blocking");
            // The server may already have closed it: then it is simply closed early.
            let _ = stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\nX-Slow: ");
            streams.push(Some(stream));
        }
        HeldConnections { streams }
    }

    /// One more byte of header on each connection still open (slowloris); notes closed ones.
    pub fn trickle(&mut self) {
        for slot in &mut self.streams {
            if let Some(stream) = slot {
                match stream.write(b"a") {
                    Ok(_) => {}
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                    Err(_) => *slot = None,
                }
            }
        }
    }

    /// How many the server has not closed yet.
    pub fn still_open(&mut self) -> usize {
        let mut buffer = [0u8; 1024];
        for slot in &mut self.streams {
            if let Some(stream) = slot {
                let closed = loop {
                    match stream.read(&mut buffer) {
                        Ok(0) => break true,
                        // A 408/431 reply before the close: read on.
                        Ok(_) => continue,
                        Err(e) if e.kind() == ErrorKind::WouldBlock => break false,
                        Err(_) => break true,
                    }
                };
                if closed {
                    *slot = None;
                }
            }
        }
        self.streams.iter().filter(|s| s.is_some()).count()
    }
}

/// Raise this process's soft open-file limit to the hard limit (a test holding thousands of
/// client sockets needs it).
pub fn raise_own_fd_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit on a local struct.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        limit.rlim_cur = limit.rlim_max;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &limit), 0);
    }
    limit.rlim_max
}

/// The soft open-file limit of `pid` as /proc shows it.
pub fn soft_fd_limit(pid: i32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/limits"))
        .ok()?
        .lines()
        .find(|l| l.starts_with("Max open files"))?
        .split_whitespace()
        .nth(3)?
        .parse()
        .ok()
}

/// Resident set size of `pid` in KiB (`field` VmRSS or VmHWM).
pub fn memory_kib(pid: i32, field: &str) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}
