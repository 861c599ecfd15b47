//! A real dnsmasq on a loopback port, serving only the A, AAAA and SRV records
//! a test gives it, so DNS discovery can be tested against a real server whose
//! records change at run time.
//!
//! dnsmasq comes from Debian's `dnsmasq-base` (the binary, no system service);
//! `.ci/run` installs it. Each [`Dnsmasq`] reads nothing of the machine's own
//! configuration (no `/etc/dnsmasq.conf`, `/etc/hosts` or `resolv.conf`), has no
//! upstream server and no DHCP, and listens on 127.0.0.1 only (UDP and TCP).
//! Every name it does not serve is answered NXDOMAIN, never forwarded.

use std::{
    fmt::Write as _,
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::PathBuf,
    process::{Child, Command, ExitStatus, Stdio},
    sync::atomic::{AtomicU16, AtomicU32, Ordering},
    time::Duration,
};

use tokio::{net::UdpSocket, time::Instant};

/// How long starting (or restarting) dnsmasq may take before [`Dnsmasq::start`] or
/// [`Dnsmasq::set`] panics.
const READY_BOUND: Duration = Duration::from_secs(10);
/// How long one probe query waits for its answer.
const QUERY_TIMEOUT: Duration = Duration::from_millis(250);
/// How long a stopped dnsmasq may take to exit after SIGTERM before it gets SIGKILL.
const STOP_BOUND: Duration = Duration::from_secs(2);

const TYPE_A: u16 = 1;
const TYPE_AAAA: u16 = 28;
const TYPE_SRV: u16 = 33;
const TYPE_OPT: u16 = 41;

/// The records a [`Dnsmasq`] serves.
///
/// Names are fully qualified without the trailing dot, e.g. `r1.flotilla.test`;
/// keep them under a private suffix such as `.flotilla.test`.
#[derive(Clone, Debug, Default)]
pub struct Zone {
    /// The TTL of every A, AAAA and SRV answer, in seconds.
    pub ttl_secs: u32,
    /// Address records: one entry per (name, address); repeat a name to give it
    /// several addresses. IPv4 addresses are served as A, IPv6 ones as AAAA.
    pub a: Vec<(String, IpAddr)>,
    /// SRV records; repeat a name to give it several.
    pub srv: Vec<Srv>,
}

/// One SRV record.
#[derive(Clone, Debug)]
pub struct Srv {
    /// The record's owner name, e.g. `_grpc._tcp.echo.flotilla.test`.
    pub name: String,
    /// The host it points at, e.g. `r1.flotilla.test`; give it A records in the
    /// same [`Zone`] for it to resolve.
    pub target: String,
    /// The port.
    pub port: u16,
    /// The priority (lower is preferred).
    pub priority: u16,
    /// The weight among records of equal priority.
    pub weight: u16,
}

/// A dnsmasq process serving a [`Zone`] on 127.0.0.1; killed and reaped on drop.
pub struct Dnsmasq {
    addr: SocketAddr,
    binary: PathBuf,
    dir: PathBuf,
    child: Option<Child>,
}

/// Why one launch did not come to serve the zone.
enum LaunchError {
    /// dnsmasq exited because the port was taken.
    PortBusy,
    /// dnsmasq exited otherwise, or never served the zone in time.
    Failed(String),
}

impl Dnsmasq {
    /// Starts dnsmasq on 127.0.0.1 on a free port (UDP and TCP) serving only `zone`,
    /// and waits (at most 10 s) until it answers every name of `zone` with exactly
    /// the zone's records and TTL, by real DNS queries over UDP.
    ///
    /// # Panics
    /// If dnsmasq is not installed (`apt-get install dnsmasq-base`), if `zone` has
    /// a name dnsmasq's configuration cannot express, or if dnsmasq exits or does
    /// not serve the zone in time (with its stderr in the message).
    pub async fn start(zone: &Zone) -> Dnsmasq {
        validate(zone);
        let mut server = Dnsmasq {
            addr: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            binary: find_binary(),
            dir: make_dir(),
            child: None,
        };
        let mut last = String::new();
        for _ in 0..8 {
            server.addr.set_port(free_port());
            match server.launch(zone, Instant::now() + READY_BOUND).await {
                Ok(()) => return server,
                // Another process took the port between our probe and dnsmasq's bind.
                Err(LaunchError::PortBusy) => last = server.stderr(),
                Err(LaunchError::Failed(why)) => panic!("{why}"),
            }
        }
        panic!("dnsmasq found no free loopback port in 8 tries; its stderr:\n{last}");
    }

    /// The address to point a resolver at (127.0.0.1, UDP and TCP).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Replaces the records served by `zone`: stops dnsmasq and starts it again on
    /// the same port (retrying for a short, bounded while if the port is briefly
    /// busy), then waits (at most 10 s) until every name of `zone` is answered with
    /// exactly the zone's records and TTL. Names no longer in the zone answer
    /// NXDOMAIN from then on.
    ///
    /// # Panics
    /// As [`Dnsmasq::start`] does, and if the port stays taken.
    pub async fn set(&mut self, zone: &Zone) {
        validate(zone);
        self.stop().await;
        let deadline = Instant::now() + READY_BOUND;
        loop {
            match self.launch(zone, deadline).await {
                Ok(()) => return,
                Err(LaunchError::PortBusy) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(LaunchError::PortBusy) => panic!(
                    "dnsmasq could not bind {} again within {READY_BOUND:?}; its stderr:\n{}",
                    self.addr,
                    self.stderr()
                ),
                Err(LaunchError::Failed(why)) => panic!("{why}"),
            }
        }
    }

    /// Writes the configuration for `zone`, spawns dnsmasq and waits until it serves
    /// `zone`. On error the child has exited or been stopped.
    async fn launch(&mut self, zone: &Zone, deadline: Instant) -> Result<(), LaunchError> {
        let conf = self.dir.join("dnsmasq.conf");
        fs::write(&conf, config(zone, self.addr.port()))
            .unwrap_or_else(|e| panic!("writing {}: {e}", conf.display()));
        let log = fs::File::create(self.stderr_path())
            .unwrap_or_else(|e| panic!("creating {}: {e}", self.stderr_path().display()));
        let child = Command::new(&self.binary)
            .arg(format!("--conf-file={}", conf.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("running {}: {e}", self.binary.display()));
        self.child = Some(child);

        loop {
            if let Some(status) = self.exited() {
                let stderr = self.stderr();
                return Err(if stderr.contains("Address already in use") {
                    LaunchError::PortBusy
                } else {
                    LaunchError::Failed(format!(
                        "dnsmasq exited ({status}) instead of serving on {}; its stderr:\n{stderr}",
                        self.addr
                    ))
                });
            }
            let mismatch = match check_zone(self.addr, zone).await {
                Ok(()) => return Ok(()),
                Err(why) => why,
            };
            if Instant::now() >= deadline {
                self.stop().await;
                return Err(LaunchError::Failed(format!(
                    "dnsmasq on {} did not serve the zone within {READY_BOUND:?}: {mismatch}\n\
                     zone: {zone:?}\nits stderr:\n{}",
                    self.addr,
                    self.stderr()
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The child's exit status, if it has exited (and is then reaped).
    fn exited(&mut self) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        let status = child.try_wait().expect("polling dnsmasq")?;
        self.child = None;
        Some(status)
    }

    /// Stops the child: SIGTERM (so dnsmasq also ends the processes it forked for
    /// TCP connections, which hold its sockets too), SIGKILL if it lingers; reaps it,
    /// and waits (bounded) until the port is free again.
    async fn stop(&mut self) {
        let Some(mut child) = self.child.take() else { return };
        terminate(&mut child);
        let deadline = std::time::Instant::now() + STOP_BOUND;
        while !stopped(&mut child, self.addr, deadline) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn stderr_path(&self) -> PathBuf {
        self.dir.join("stderr.log")
    }

    /// What the current (or last) dnsmasq wrote to stderr.
    fn stderr(&self) -> String {
        fs::read_to_string(self.stderr_path()).unwrap_or_default()
    }
}

impl Drop for Dnsmasq {
    /// Stops dnsmasq as [`Dnsmasq::set`] does (blocking, at most 2 s) and removes
    /// its temporary directory.
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            terminate(&mut child);
            let deadline = std::time::Instant::now() + STOP_BOUND;
            while !stopped(&mut child, self.addr, deadline) {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// One poll of a stopping dnsmasq: true once it has exited and the processes it
/// forked have released `addr` (dnsmasq signals them on SIGTERM but does not wait
/// for them), or once `deadline` has passed (then after SIGKILL).
fn stopped(child: &mut Child, addr: SocketAddr, deadline: std::time::Instant) -> bool {
    let exited = matches!(child.try_wait(), Ok(Some(_)));
    if std::time::Instant::now() >= deadline {
        if !exited {
            let _ = child.kill();
            let _ = child.wait();
        }
        return true;
    }
    exited && std::net::UdpSocket::bind(addr).is_ok() && std::net::TcpListener::bind(addr).is_ok()
}

/// Sends SIGTERM through kill(1) (the crate forbids unsafe code, so no libc), or
/// SIGKILL if kill(1) cannot run.
fn terminate(child: &mut Child) {
    let sent = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !sent {
        let _ = child.kill();
    }
}

/// Panics on names dnsmasq's configuration syntax cannot carry.
fn validate(zone: &Zone) {
    let names =
        zone.a.iter().map(|(n, _)| n.as_str()).chain(zone.srv.iter().flat_map(|s| [&*s.name, &*s.target]));
    for name in names {
        let plain = name.trim_end_matches('.');
        assert!(
            !plain.is_empty()
                && plain.split('.').all(|l| !l.is_empty() && l.len() < 64)
                && plain.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.'),
            "dnsmasq zone name {name:?} must be a dotted name of letters, digits, '-' and '_'"
        );
    }
}

/// dnsmasq's configuration serving `zone` on 127.0.0.1:`port`.
fn config(zone: &Zone, port: u16) -> String {
    let mut c = String::from(
        "# Written by flotilla-testkit's dns harness.\n\
         keep-in-foreground\n\
         # Stay root when root (no drop to the 'dnsmasq' user); a no-op otherwise.\n\
         user=root\n\
         pid-file=\n\
         log-facility=-\n\
         # Nothing from the machine: no /etc/hosts, no resolv.conf, no upstream.\n\
         no-hosts\n\
         no-resolv\n\
         no-poll\n\
         # Answer NXDOMAIN for every name not configured here, never forward.\n\
         local=/#/\n\
         bind-interfaces\n\
         listen-address=127.0.0.1\n",
    );
    let _ = writeln!(c, "port={port}");
    // The TTL dnsmasq gives answers from its own configuration (default 0).
    let _ = writeln!(c, "local-ttl={}", zone.ttl_secs);
    for (name, ip) in &zone.a {
        let _ = writeln!(c, "host-record={},{ip}", name.trim_end_matches('.'));
    }
    for s in &zone.srv {
        let _ = writeln!(
            c,
            "srv-host={},{},{},{},{}",
            s.name.trim_end_matches('.'),
            s.target.trim_end_matches('.'),
            s.port,
            s.priority,
            s.weight
        );
    }
    c
}

/// The dnsmasq binary: on PATH or in the sbin directories a non-root PATH lacks.
fn find_binary() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/local/sbin"].map(PathBuf::from))
        .map(|d| d.join("dnsmasq"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "dnsmasq is not installed (not on PATH nor in /usr/sbin): \
                 run `apt-get install dnsmasq-base` (CI's .ci/run installs it)"
            )
        })
}

/// A fresh directory for one dnsmasq's configuration and log.
fn make_dir() -> PathBuf {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let base = std::env::temp_dir();
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = base.join(format!("flotilla-dnsmasq-{}-{n}", std::process::id()));
        match fs::create_dir(&dir) {
            Ok(()) => return dir,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => panic!("creating {}: {e}", dir.display()),
        }
    }
}

/// A 127.0.0.1 port free for both UDP and TCP right now.
fn free_port() -> u16 {
    for _ in 0..100 {
        let udp = std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).expect("binding a loopback UDP port");
        let port = udp.local_addr().expect("bound").port();
        if std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok() {
            return port;
        }
    }
    panic!("no loopback port free for both UDP and TCP in 100 tries");
}

/// The answers `zone` must give, as (name, type, sorted rdata rendered by [`RData::render`]).
fn expected(zone: &Zone) -> Vec<(String, u16, Vec<String>)> {
    let mut out: Vec<(String, u16, Vec<String>)> = Vec::new();
    let mut add = |name: &str, qtype: u16, rdata: String| {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        match out.iter_mut().find(|(n, t, _)| *n == name && *t == qtype) {
            Some((_, _, v)) => v.push(rdata),
            None => out.push((name, qtype, vec![rdata])),
        }
    };
    for (name, ip) in &zone.a {
        let (qtype, data) = match ip {
            IpAddr::V4(v4) => (TYPE_A, RData::A(*v4)),
            IpAddr::V6(v6) => (TYPE_AAAA, RData::Aaaa(*v6)),
        };
        add(name, qtype, data.render());
    }
    for s in &zone.srv {
        let data = RData::Srv {
            priority: s.priority,
            weight: s.weight,
            port: s.port,
            target: s.target.trim_end_matches('.').to_owned(),
        };
        add(&s.name, TYPE_SRV, data.render());
    }
    for (_, _, v) in &mut out {
        v.sort();
        v.dedup();
    }
    out
}

/// Ok when `server` answers every name of `zone` exactly (records and TTL), or, for
/// an empty zone, answers at all.
async fn check_zone(server: SocketAddr, zone: &Zone) -> Result<(), String> {
    let expected = expected(zone);
    if expected.is_empty() {
        return query(server, "ready.flotilla.test", TYPE_A, QUERY_TIMEOUT).await.map(drop);
    }
    for (name, qtype, want) in expected {
        let answer = query(server, &name, qtype, QUERY_TIMEOUT).await?;
        let records: Vec<_> = answer.answers.iter().filter(|r| r.rtype == qtype).collect();
        let mut got: Vec<String> = records.iter().map(|r| r.data.render()).collect();
        got.sort();
        if got != want {
            return Err(format!(
                "{name} type {qtype}: wanted {want:?}, got {got:?} (rcode {})",
                answer.rcode
            ));
        }
        if let Some(r) = records.iter().find(|r| r.ttl != zone.ttl_secs) {
            return Err(format!("{name} type {qtype}: wanted TTL {}, got {}", zone.ttl_secs, r.ttl));
        }
    }
    Ok(())
}

/// A parsed DNS response (just what the harness and its tests look at).
#[derive(Debug)]
struct Answer {
    rcode: u8,
    answers: Vec<Record>,
}

/// One answer-section record.
#[derive(Debug)]
struct Record {
    #[cfg_attr(not(test), allow(dead_code))]
    name: String,
    rtype: u16,
    ttl: u32,
    data: RData,
}

#[derive(Debug, PartialEq)]
enum RData {
    A(Ipv4Addr),
    Aaaa(Ipv6Addr),
    Srv { priority: u16, weight: u16, port: u16, target: String },
    Other(Vec<u8>),
}

impl RData {
    fn render(&self) -> String {
        match self {
            RData::A(ip) => ip.to_string(),
            RData::Aaaa(ip) => ip.to_string(),
            RData::Srv { priority, weight, port, target } => {
                format!("{priority} {weight} {port} {}", target.to_ascii_lowercase())
            }
            RData::Other(b) => format!("{b:02x?}"),
        }
    }
}

/// Sends one query for (`name`, `qtype`) to `server` over UDP and parses the answer.
async fn query(server: SocketAddr, name: &str, qtype: u16, timeout: Duration) -> Result<Answer, String> {
    static NEXT_ID: AtomicU16 = AtomicU16::new(0x1f00);
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    let socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await.map_err(|e| format!("binding: {e}"))?;
    socket.connect(server).await.map_err(|e| format!("connecting to {server}: {e}"))?;
    socket.send(&encode_query(id, name, qtype)).await.map_err(|e| format!("sending: {e}"))?;
    let mut buf = vec![0u8; 65535];
    let deadline = Instant::now() + timeout;
    loop {
        let n = match tokio::time::timeout_at(deadline, socket.recv(&mut buf)).await {
            Ok(Ok(n)) => n,
            // E.g. ECONNREFUSED while nothing listens yet.
            Ok(Err(e)) => return Err(format!("no answer from {server} for {name}: {e}")),
            Err(_) => return Err(format!("no answer from {server} for {name} within {timeout:?}")),
        };
        if n >= 2 && buf[..2] == id.to_be_bytes() {
            return parse_answer(&buf[..n]);
        }
    }
}

/// A recursion-desired query with an EDNS0 OPT record (4096-byte UDP payload, so
/// answers with many records are not truncated).
fn encode_query(id: u16, name: &str, qtype: u16) -> Vec<u8> {
    let mut q = Vec::with_capacity(32 + name.len());
    q.extend_from_slice(&id.to_be_bytes());
    // Flags RD; QDCOUNT 1, ANCOUNT 0, NSCOUNT 0, ARCOUNT 1.
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 1]);
    for label in name.trim_end_matches('.').split('.') {
        assert!(!label.is_empty() && label.len() < 64, "bad DNS name {name:?}");
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.push(0);
    q.extend_from_slice(&qtype.to_be_bytes());
    q.extend_from_slice(&1u16.to_be_bytes()); // class IN
    // OPT: root name, type, class = UDP payload size, TTL 0 (extended rcode/flags), RDLENGTH 0.
    q.push(0);
    q.extend_from_slice(&TYPE_OPT.to_be_bytes());
    q.extend_from_slice(&4096u16.to_be_bytes());
    q.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
    q
}

fn parse_answer(msg: &[u8]) -> Result<Answer, String> {
    let u16_at = |pos: usize| -> Result<u16, String> {
        msg.get(pos..pos + 2).map(|b| u16::from_be_bytes([b[0], b[1]])).ok_or_else(|| "truncated".to_owned())
    };
    let flags = u16_at(2)?;
    if flags & 0x8000 == 0 {
        return Err("not a response".to_owned());
    }
    if flags & 0x0200 != 0 {
        return Err("answer truncated (TC)".to_owned());
    }
    let (qdcount, ancount) = (u16_at(4)?, u16_at(6)?);
    let mut pos = 12;
    for _ in 0..qdcount {
        pos = read_name(msg, pos)?.1 + 4;
    }
    let mut answers = Vec::with_capacity(ancount.into());
    for _ in 0..ancount {
        let (name, after) = read_name(msg, pos)?;
        let rtype = u16_at(after)?;
        let ttl = (u32::from(u16_at(after + 4)?) << 16) | u32::from(u16_at(after + 6)?);
        let len = usize::from(u16_at(after + 8)?);
        let start = after + 10;
        let rdata = msg.get(start..start + len).ok_or("truncated rdata")?;
        let data = match (rtype, len) {
            (TYPE_A, 4) => RData::A(Ipv4Addr::new(rdata[0], rdata[1], rdata[2], rdata[3])),
            (TYPE_AAAA, 16) => RData::Aaaa(Ipv6Addr::from(<[u8; 16]>::try_from(rdata).expect("16 bytes"))),
            (TYPE_SRV, 7..) => RData::Srv {
                priority: u16_at(start)?,
                weight: u16_at(start + 2)?,
                port: u16_at(start + 4)?,
                target: read_name(msg, start + 6)?.0,
            },
            _ => RData::Other(rdata.to_vec()),
        };
        answers.push(Record { name, rtype, ttl, data });
        pos = start + len;
    }
    Ok(Answer { rcode: (flags & 0x000f) as u8, answers })
}

/// Reads the (possibly compressed) name at `pos`: (dotted name, position after it).
fn read_name(msg: &[u8], mut pos: usize) -> Result<(String, usize), String> {
    let mut labels: Vec<String> = Vec::new();
    let mut after = None;
    for _ in 0..128 {
        let len = usize::from(*msg.get(pos).ok_or("name runs past the end")?);
        if len & 0xc0 == 0xc0 {
            let low = usize::from(*msg.get(pos + 1).ok_or("name runs past the end")?);
            after.get_or_insert(pos + 2);
            pos = ((len & 0x3f) << 8) | low;
        } else if len == 0 {
            return Ok((labels.join("."), after.unwrap_or(pos + 1)));
        } else {
            let label = msg.get(pos + 1..pos + 1 + len).ok_or("label runs past the end")?;
            labels.push(String::from_utf8_lossy(label).into_owned());
            pos += 1 + len;
        }
    }
    Err("name compression loops".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    const ECHO_SRV: &str = "_grpc._tcp.echo.flotilla.test";
    const RCODE_NXDOMAIN: u8 = 3;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("an IP address")
    }

    fn srv(target: &str, port: u16, priority: u16, weight: u16) -> Srv {
        Srv { name: ECHO_SRV.to_owned(), target: target.to_owned(), port, priority, weight }
    }

    fn zone() -> Zone {
        Zone {
            ttl_secs: 30,
            a: vec![
                ("echo.flotilla.test".to_owned(), ip("127.0.0.2")),
                ("echo.flotilla.test".to_owned(), ip("127.0.0.3")),
                ("r1.flotilla.test".to_owned(), ip("127.0.0.2")),
                ("r2.flotilla.test".to_owned(), ip("127.0.0.3")),
            ],
            srv: vec![srv("r1.flotilla.test", 50051, 10, 5), srv("r2.flotilla.test", 50052, 20, 1)],
        }
    }

    async fn ask(server: &Dnsmasq, name: &str, qtype: u16) -> Answer {
        query(server.addr(), name, qtype, Duration::from_secs(2)).await.expect("dnsmasq answers")
    }

    /// One query over an open TCP connection (length-prefixed messages).
    async fn ask_tcp(tcp: &mut tokio::net::TcpStream, name: &str, qtype: u16) -> Answer {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let q = encode_query(7, name, qtype);
        tcp.write_all(&u16::try_from(q.len()).expect("short").to_be_bytes()).await.expect("written");
        tcp.write_all(&q).await.expect("written");
        let len = usize::from(tcp.read_u16().await.expect("an answer length"));
        let mut buf = vec![0; len];
        tcp.read_exact(&mut buf).await.expect("an answer");
        parse_answer(&buf).expect("a DNS answer")
    }

    fn addrs(answer: &Answer) -> Vec<IpAddr> {
        let mut v: Vec<IpAddr> = answer
            .answers
            .iter()
            .filter_map(|r| match r.data {
                RData::A(a) => Some(IpAddr::V4(a)),
                RData::Aaaa(a) => Some(IpAddr::V6(a)),
                _ => None,
            })
            .collect();
        v.sort();
        v
    }

    fn srvs(answer: &Answer) -> Vec<(u16, u16, u16, String)> {
        let mut v: Vec<_> = answer
            .answers
            .iter()
            .filter_map(|r| match &r.data {
                RData::Srv { priority, weight, port, target } => {
                    Some((*priority, *weight, *port, target.clone()))
                }
                _ => None,
            })
            .collect();
        v.sort();
        v
    }

    fn ttls(answer: &Answer) -> Vec<u32> {
        answer.answers.iter().map(|r| r.ttl).collect()
    }

    #[tokio::test]
    async fn serves_a_and_srv_records_with_the_zone_ttl() {
        let dns = Dnsmasq::start(&zone()).await;
        assert_eq!(dns.addr().ip(), IpAddr::V4(Ipv4Addr::LOCALHOST));

        let a = ask(&dns, "echo.flotilla.test", TYPE_A).await;
        assert_eq!(a.rcode, 0);
        assert_eq!(a.answers.len(), 2, "{a:?}");
        assert!(a.answers.iter().all(|r| r.name == "echo.flotilla.test" && r.rtype == TYPE_A));
        assert_eq!(addrs(&a), [ip("127.0.0.2"), ip("127.0.0.3")]);
        assert_eq!(ttls(&a), [30, 30]);

        let s = ask(&dns, ECHO_SRV, TYPE_SRV).await;
        assert_eq!(s.rcode, 0);
        assert_eq!(s.answers.len(), 2, "{s:?}");
        assert_eq!(
            srvs(&s),
            [(10, 5, 50051, "r1.flotilla.test".to_owned()), (20, 1, 50052, "r2.flotilla.test".to_owned())]
        );
        assert_eq!(ttls(&s), [30, 30]);

        // SRV targets resolve through the A records.
        assert_eq!(addrs(&ask(&dns, "r1.flotilla.test", TYPE_A).await), [ip("127.0.0.2")]);
        // Unknown names are NXDOMAIN, not forwarded nor refused.
        let missing = ask(&dns, "nope.flotilla.test", TYPE_A).await;
        assert_eq!((missing.rcode, missing.answers.len()), (RCODE_NXDOMAIN, 0));
        let elsewhere = ask(&dns, "example.com", TYPE_A).await;
        assert_eq!((elsewhere.rcode, elsewhere.answers.len()), (RCODE_NXDOMAIN, 0));
        // A name with only A records has no AAAA (NODATA).
        let aaaa = ask(&dns, "echo.flotilla.test", TYPE_AAAA).await;
        assert_eq!((aaaa.rcode, aaaa.answers.len()), (0, 0));
    }

    #[tokio::test]
    async fn set_replaces_the_records_on_the_same_port() {
        let mut dns = Dnsmasq::start(&zone()).await;
        let addr = dns.addr();
        // A TCP client left connected is served by a process dnsmasq forked, which
        // holds the listening socket too: the restart must still get the port.
        let mut tcp = tokio::net::TcpStream::connect(addr).await.expect("dnsmasq listens on TCP");
        assert_eq!(ask_tcp(&mut tcp, "r1.flotilla.test", TYPE_A).await.answers.len(), 1);

        let changed = Zone {
            ttl_secs: 5,
            a: vec![
                ("echo.flotilla.test".to_owned(), ip("127.0.0.4")),
                ("r3.flotilla.test".to_owned(), ip("127.0.0.4")),
            ],
            srv: vec![srv("r3.flotilla.test", 6000, 1, 1)],
        };
        dns.set(&changed).await;
        assert_eq!(dns.addr(), addr);

        let a = ask(&dns, "echo.flotilla.test", TYPE_A).await;
        assert_eq!(addrs(&a), [ip("127.0.0.4")]);
        assert_eq!(ttls(&a), [5]);
        let s = ask(&dns, ECHO_SRV, TYPE_SRV).await;
        assert_eq!(srvs(&s), [(1, 1, 6000, "r3.flotilla.test".to_owned())]);
        assert_eq!(ttls(&s), [5]);
        let gone = ask(&dns, "r1.flotilla.test", TYPE_A).await;
        assert_eq!((gone.rcode, gone.answers.len()), (RCODE_NXDOMAIN, 0));

        // And back, twice more, to show restarts on the same port are repeatable.
        dns.set(&zone()).await;
        assert_eq!(addrs(&ask(&dns, "echo.flotilla.test", TYPE_A).await), [ip("127.0.0.2"), ip("127.0.0.3")]);
        dns.set(&Zone::default()).await;
        let empty = ask(&dns, ECHO_SRV, TYPE_SRV).await;
        assert_eq!((empty.rcode, empty.answers.len()), (RCODE_NXDOMAIN, 0));
        assert_eq!(dns.addr(), addr);
    }

    #[tokio::test]
    async fn serves_an_empty_zone_aaaa_records_and_tcp() {
        let empty = Dnsmasq::start(&Zone::default()).await;
        let none = ask(&empty, "echo.flotilla.test", TYPE_A).await;
        assert_eq!((none.rcode, none.answers.len()), (RCODE_NXDOMAIN, 0));

        let v6 = Zone {
            ttl_secs: 0,
            a: vec![
                ("dual.flotilla.test".to_owned(), ip("::1")),
                ("dual.flotilla.test".to_owned(), ip("127.0.0.5")),
            ],
            srv: vec![],
        };
        let dns = Dnsmasq::start(&v6).await;
        assert_ne!(dns.addr(), empty.addr());
        let aaaa = ask(&dns, "dual.flotilla.test", TYPE_AAAA).await;
        assert_eq!((addrs(&aaaa), ttls(&aaaa)), (vec![ip("::1")], vec![0]));

        // The same port answers over TCP.
        let mut tcp = tokio::net::TcpStream::connect(dns.addr()).await.expect("dnsmasq listens on TCP");
        assert_eq!(addrs(&ask_tcp(&mut tcp, "dual.flotilla.test", TYPE_A).await), [ip("127.0.0.5")]);
    }

    #[tokio::test]
    async fn drop_stops_dnsmasq_and_frees_the_port() {
        let dns = Dnsmasq::start(&zone()).await;
        let (addr, dir) = (dns.addr(), dns.dir.clone());
        let mut tcp = tokio::net::TcpStream::connect(addr).await.expect("dnsmasq listens on TCP");
        assert_eq!(ask_tcp(&mut tcp, "r1.flotilla.test", TYPE_A).await.answers.len(), 1);
        drop(dns);
        std::net::UdpSocket::bind(addr).expect("the UDP port is free again");
        std::net::TcpListener::bind(addr).expect("the TCP port is free again");
        assert!(!dir.exists(), "the temp dir is removed");
    }

    #[test]
    fn read_name_follows_compression_and_stops_on_loops() {
        // "a.b" at 0, then a pointer to it at 5, then a self-loop at 7.
        let msg = [1, b'a', 1, b'b', 0, 0xc0, 0, 0xc0, 7];
        assert_eq!(read_name(&msg, 0), Ok(("a.b".to_owned(), 5)));
        assert_eq!(read_name(&msg, 5), Ok(("a.b".to_owned(), 7)));
        assert!(read_name(&msg, 7).is_err());
    }
}
