//! Shared by the triage tests and benchmark: a goroutine dump generated on the fly, so a
//! 100 MB input never exists as a file or a buffer.
#![allow(dead_code)]

use std::io::{self, Read};

/// Stacks seen in a wedged dockerd; `{a}` is replaced by varying argument values.
const TEMPLATES: &[(&str, &str)] = &[
    (
        "semacquire",
        "sync.runtime_SemacquireMutex(0xc000{a}?, 0x0?, 0x1?)
\t/usr/lib/go-1.19/src/runtime/sema.go:77 +0x26
sync.(*Mutex).lockSlow(0xc000{a})
\t/usr/lib/go-1.19/src/sync/mutex.go:171 +0x165
sync.(*Mutex).Lock(...)
\t/usr/lib/go-1.19/src/sync/mutex.go:90
github.com/docker/docker/daemon.(*Daemon).killWithSignal(0xc000784000, 0xc000{a}, 0xf)
\t/build/src/github.com/docker/docker/daemon/kill.go:67 +0x1c5
github.com/docker/docker/daemon.(*Daemon).ContainerKill(0xc000784000, {0xc000{a}, 0x40}, 0x9)
\t/build/src/github.com/docker/docker/daemon/kill.go:42 +0x1ab
net/http.(*conn).serve(0xc000{a}, {0x563645ce1c18, 0xc000ed3e90})
\t/usr/lib/go-1.19/src/net/http/server.go:1991 +0x607
created by net/http.(*Server).Serve
\t/usr/lib/go-1.19/src/net/http/server.go:3102 +0x4db
",
    ),
    (
        "select",
        "google.golang.org/grpc/internal/transport.(*Stream).waitOnHeader(0xc000{a})
\t/build/src/google.golang.org/grpc/internal/transport/transport.go:321 +0x7c
google.golang.org/grpc.(*csAttempt).recvMsg(0xc000{a}, {0x563645be49e0?, 0xc000{a}}, 0x0?)
\t/build/src/google.golang.org/grpc/stream.go:894 +0xba
google.golang.org/grpc.invoke({0x563645ce1c18?, 0xc000{a}?}, {0x56364520766e?, 0xc0007b2240?}, {0x563645be48a0, 0xc0000a2640}, ...)
\t/build/src/google.golang.org/grpc/call.go:73 +0xd7
google.golang.org/grpc.(*ClientConn).Invoke(0x7f40fa4895b8?, {0x563645ce1ba8?, 0xc000126008?}, {0x0, ...})
\t/build/src/google.golang.org/grpc/call.go:35 +0x21f
github.com/containerd/containerd/api/services/tasks/v1.(*tasksClient).Kill(0xc000{a}, {0x563645ce1ba8, 0xc000126008}, 0x10?, {0x0, 0x0, 0x0})
\t/build/src/github.com/containerd/containerd/api/services/tasks/v1/tasks.pb.go:1123 +0xc9
github.com/docker/docker/libcontainerd/remote.(*client).SignalProcess(0xc0006576c0, {0x563645ce1ba8, 0xc000126008}, {0xc000{a}, 0x40}, {0x563645188787, 0x4}, 0xf)
\t/build/src/github.com/docker/docker/libcontainerd/remote/client.go:393 +0x1c5
github.com/docker/docker/daemon.(*Daemon).killWithSignal(0xc000784000, 0xc000{a}, 0xf)
\t/build/src/github.com/docker/docker/daemon/kill.go:82 +0x2a5
created by net/http.(*Server).Serve
\t/usr/lib/go-1.19/src/net/http/server.go:3102 +0x4db
",
    ),
    (
        "IO wait",
        "internal/poll.runtime_pollWait(0x7f40d{a}, 0x72)
\t/usr/lib/go-1.19/src/runtime/netpoll.go:305 +0x89
internal/poll.(*FD).Accept(0xc000{a})
\t/usr/lib/go-1.19/src/internal/poll/fd_unix.go:614 +0x234
net.(*UnixListener).Accept(0xc000{a})
\t/usr/lib/go-1.19/src/net/unixsock.go:260 +0x3d
net/http.(*Server).Serve(0xc0000520f0, {0x563645cdff58, 0xc000{a}})
\t/usr/lib/go-1.19/src/net/http/server.go:3070 +0x385
created by github.com/docker/docker/api/server.(*Server).serveAPI
\t/build/src/github.com/docker/docker/api/server/server.go:116 +0x9e
",
    ),
    (
        "syscall",
        "os/signal.signal_recv()
\t/usr/lib/go-1.19/src/runtime/sigqueue.go:152 +0x2f
os/signal.loop()
\t/usr/lib/go-1.19/src/os/signal/signal_unix.go:23 +0x19
created by os/signal.Notify.func1.1
\t/usr/lib/go-1.19/src/os/signal/signal.go:151 +0x2a
",
    ),
];

/// Distinct stack variants: each template is emitted at this many different source lines.
const VARIANTS: u64 = 50;

/// A dump of `target` bytes (rounded up to a whole goroutine), produced as it is read.
/// With `embedded`, the dump is escaped into one containerd log line, as a shim's would be.
pub struct GeneratedDump {
    target: u64,
    produced: u64,
    embedded: bool,
    buf: Vec<u8>,
    pos: usize,
    goroutines: u64,
    state: u64,
    finished: bool,
}

impl GeneratedDump {
    pub fn new(target: u64) -> Self {
        Self::with_form(target, false)
    }

    pub fn embedded(target: u64) -> Self {
        Self::with_form(target, true)
    }

    fn with_form(target: u64, embedded: bool) -> Self {
        let mut dump = Self {
            target,
            produced: 0,
            embedded,
            buf: Vec::with_capacity(4096),
            pos: 0,
            goroutines: 0,
            state: 0x9e37_79b9_7f4a_7c15,
            finished: false,
        };
        if embedded {
            dump.buf.extend_from_slice(
                b"time=\"2026-11-23T00:08:48.000000000Z\" level=info msg=\"=== BEGIN goroutine stack dump ===\\n",
            );
        }
        dump
    }

    /// Goroutines produced so far (all of them once the reader is exhausted).
    pub fn goroutines(&self) -> u64 {
        self.goroutines
    }

    fn next_random(&mut self) -> u64 {
        // xorshift64*: deterministic and dependency-free.
        self.state ^= self.state >> 12;
        self.state ^= self.state << 25;
        self.state ^= self.state >> 27;
        self.state.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn refill(&mut self) {
        self.buf.clear();
        self.pos = 0;
        if self.produced >= self.target {
            if self.embedded && !self.finished {
                self.buf.extend_from_slice(
                    b"\\n=== END goroutine stack dump ===\" runtime=io.containerd.runc.v2\n",
                );
            }
            self.finished = true;
            return;
        }
        let r = self.next_random();
        let (state, body) = TEMPLATES[(r % TEMPLATES.len() as u64) as usize];
        let variant = (r >> 8) % VARIANTS;
        let minutes = (r >> 16) % 3000;
        self.goroutines += 1;
        let mut text = format!(
            "goroutine {} [{state}, {minutes} minutes]:\n",
            self.goroutines + 100
        );
        let mut rest = body;
        while let Some(at) = rest.find("{a}") {
            text.push_str(&rest[..at]);
            text.push_str(&format!("{:06x}", self.next_random() & 0xff_ffff));
            rest = &rest[at + 3..];
        }
        text.push_str(rest);
        // Vary one source line so there are several distinct stacks per template.
        text = text.replacen(".go:", &format!(".go:{variant}0"), 1);
        text.push('\n');
        if self.embedded {
            let escaped = text
                .replace('\\', "\\\\")
                .replace('"', "\\\"")
                .replace('\n', "\\n")
                .replace('\t', "\\t");
            self.buf.extend_from_slice(escaped.as_bytes());
        } else {
            self.buf.extend_from_slice(text.as_bytes());
        }
        self.produced += self.buf.len() as u64;
    }
}

impl Read for GeneratedDump {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.pos == self.buf.len() {
            if self.finished {
                return Ok(0);
            }
            self.refill();
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Go's `%q` quoting as logrus applies it to a message (the escapes that occur in dumps).
pub fn go_quote(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for ch in text.chars() {
        match ch {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            other => out.push(other),
        }
    }
    out.push('"');
    out
}
