//! A service binary run as a child process on loopback ports, its stderr captured (for tests
//! of what a service logs), killed when dropped.

use std::{
    io::Read as _,
    net::SocketAddr,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

/// A running service binary.
pub struct ServiceProcess {
    /// Its gRPC address.
    pub addr: SocketAddr,
    /// Its admin HTTP address.
    pub admin: SocketAddr,
    child: Child,
    stderr: Arc<Mutex<Vec<u8>>>,
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A free loopback port (bound, then released for the child to take).
fn free_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("binding a loopback port");
    l.local_addr().expect("bound")
}

impl ServiceProcess {
    /// Starts `binary` with `--listen`/`--admin-listen` on free loopback ports, the extra `args`
    /// and `env`, and waits (at most 20 s) until its `/readyz` answers 200.
    ///
    /// # Panics
    /// When it cannot start or does not become ready, with what it printed.
    pub async fn start(binary: &str, args: &[&str], env: &[(&str, &str)]) -> Self {
        let (addr, admin) = (free_port(), free_port());
        let mut child = Command::new(binary)
            .args(["--listen", &addr.to_string(), "--admin-listen", &admin.to_string()])
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {binary}: {e}"));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let mut pipe = child.stderr.take().expect("stderr is piped");
        let sink = stderr.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock().expect("not poisoned").extend_from_slice(&buf[..n]);
            }
        });
        let process = Self { addr, admin, child, stderr };
        let ready = tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                if let Ok(Ok((200, _))) =
                    tokio::time::timeout(Duration::from_secs(1), try_get(admin, "/readyz")).await
                {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        if ready.is_err() {
            panic!("{binary} did not become ready within 20 s; it printed:\n{}", process.stderr());
        }
        process
    }

    /// Everything it has written to stderr so far.
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().expect("not poisoned")).into_owned()
    }
}

async fn try_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes()).await?;
    let mut out = String::new();
    s.read_to_string(&mut out).await?;
    let code = out.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    Ok((code, out))
}
