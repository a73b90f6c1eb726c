//! `TCP_NODELAY` on this process's connections to PostgreSQL.
//!
//! sqlx 0.9.0 opens its TCP sockets with Nagle's algorithm on (transact-rs/sqlx#4335; the fix,
//! #4336, is not in a release). A message the driver writes in two parts, or two messages written
//! before a reply, then waits for the server's delayed acknowledgement: 40 ms on Linux, on a
//! statement that runs in a millisecond (docs/PERFORMANCE.md, "The driver's 40 ms wait").
//! libpq, pgbouncer and sqlx before 0.9 all set `TCP_NODELAY`.
//!
//! sqlx does not hand out its socket, and the workspace forbids the `unsafe` that borrowing a raw
//! descriptor would take. So, on Linux, each new connection's callback looks at the process's
//! open descriptors (`/proc/self/fd`), takes a duplicate of each socket through `pidfd_getfd`
//! (safe: the duplicate is a descriptor this code owns, and it refers to the same socket), and
//! turns the option on for every TCP socket whose peer has the database's port and lacks it.
//! A socket of another kind, or one closed meanwhile, is skipped. The option belongs to the
//! socket, so setting it through the duplicate sets it for sqlx's descriptor too.
//!
//! Best effort: where the system refuses (`pidfd_getfd` needs Linux 5.6 and may be filtered by a
//! container's seccomp profile) the connection works as before, with a warning logged once; the
//! Unix socket (`?host=/var/run/postgresql`), which has no Nagle's algorithm, avoids the wait
//! entirely (docs/operations.md). Elsewhere than Linux this does nothing.

/// What one sweep did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sweep {
    /// TCP sockets to the port that had Nagle's algorithm on and now have it off.
    pub set: usize,
    /// TCP sockets to the port that already had it off.
    pub already: usize,
}

/// Turns `TCP_NODELAY` on for every TCP socket of this process whose peer port is `port`.
#[cfg(target_os = "linux")]
pub fn sweep(port: u16) -> std::io::Result<Sweep> {
    use rustix::net::sockopt;
    let mut done = Sweep::default();
    let refused = each_tcp_socket(|socket| {
        let peer = rustix::net::getpeername(socket)
            .ok()
            .flatten()
            .and_then(|address| std::net::SocketAddr::try_from(address).ok());
        if peer.is_none_or(|peer| peer.port() != port) {
            return Ok(());
        }
        if sockopt::tcp_nodelay(socket)? {
            done.already += 1;
        } else {
            sockopt::set_tcp_nodelay(socket, true)?;
            done.set += 1;
        }
        Ok(())
    })?;
    // One socket that could not be set (closed meanwhile, say) does not fail the others; a sweep
    // that was refused and set nothing (so not the new connection either) says so.
    match refused {
        Some(error) if done.set == 0 => Err(error.into()),
        _ => Ok(done),
    }
}

/// Calls `visit` with a duplicate of each TCP socket of this process (an IPv4 or IPv6 stream
/// socket), duplicated through `pidfd_getfd`; returns the last error of a socket that could not
/// be duplicated or visited (a descriptor closed since the listing is skipped silently).
#[cfg(target_os = "linux")]
fn each_tcp_socket(
    mut visit: impl FnMut(&rustix::fd::OwnedFd) -> rustix::io::Result<()>,
) -> std::io::Result<Option<rustix::io::Errno>> {
    use rustix::process::{getpid, pidfd_getfd, pidfd_open, PidfdFlags, PidfdGetfdFlags};
    let pidfd = pidfd_open(getpid(), PidfdFlags::empty())?;
    let mut refused = None;
    for entry in std::fs::read_dir("/proc/self/fd")? {
        let entry = entry?;
        let Some(fd) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        // Only sockets: the link reads `socket:[inode]`. A descriptor closed since the listing
        // has no link and is skipped.
        let is_socket = std::fs::read_link(entry.path())
            .is_ok_and(|target| target.to_string_lossy().starts_with("socket:"));
        if !is_socket {
            continue;
        }
        let socket = match pidfd_getfd(&pidfd, fd, PidfdGetfdFlags::empty()) {
            Ok(socket) => socket,
            Err(rustix::io::Errno::BADF) => continue,
            Err(error) => {
                refused = Some(error);
                continue;
            }
        };
        let stream = rustix::net::sockopt::socket_type(&socket)
            .is_ok_and(|kind| kind == rustix::net::SocketType::STREAM);
        let internet = rustix::net::getsockname(&socket)
            .is_ok_and(|address| std::net::SocketAddr::try_from(address).is_ok());
        if stream && internet {
            if let Err(error) = visit(&socket) {
                refused = Some(error);
            }
        }
    }
    Ok(refused)
}

/// Whether this process's TCP socket with local port `port` has `TCP_NODELAY` on (`None`: no
/// such socket). For tests.
#[cfg(all(test, target_os = "linux"))]
pub(crate) fn nodelay_of_local_port(port: u16) -> std::io::Result<Option<bool>> {
    let mut found = None;
    each_tcp_socket(|socket| {
        let local = rustix::net::getsockname(socket)
            .ok()
            .and_then(|address| std::net::SocketAddr::try_from(address).ok());
        if local.is_some_and(|local| local.port() == port) {
            found = Some(rustix::net::sockopt::tcp_nodelay(socket)?);
        }
        Ok(())
    })?;
    Ok(found)
}

#[cfg(not(target_os = "linux"))]
pub fn sweep(_port: u16) -> std::io::Result<Sweep> {
    Ok(Sweep::default())
}

/// The port a PostgreSQL URL connects to over TCP, or `None` for a Unix socket (a `host`
/// parameter that is a path, or no host at all).
pub fn tcp_port(url: &str) -> Option<u16> {
    let rest = url.split_once("://")?.1;
    let (authority, query) = match rest.split_once('?') {
        Some((before, query)) => (before, Some(query)),
        None => (rest, None),
    };
    let authority = authority.split('/').next().unwrap_or_default();
    let host_port = authority
        .rsplit_once('@')
        .map_or(authority, |(_, host)| host);
    let socket_host = query.into_iter().flat_map(|q| q.split('&')).any(|pair| {
        pair.split_once('=').is_some_and(|(key, value)| {
            key == "host" && (value.starts_with('/') || value.starts_with("%2F"))
        })
    });
    if host_port.is_empty() || socket_host {
        return None;
    }
    // An IPv6 literal is bracketed: `[::1]:5432`.
    let port = match host_port.rsplit_once(':') {
        Some((host, port)) if !port.contains(']') && !host.is_empty() => port.parse().ok()?,
        _ => 5432,
    };
    Some(port)
}

/// Makes every new connection of a pool built with `options` sweep the process's sockets to the
/// port of `url` (nothing for SQLite or a PostgreSQL Unix socket).
pub fn on_every_connection(options: &mut sea_orm::ConnectOptions, url: &str) {
    if !url.starts_with("postgres") {
        return;
    }
    let Some(port) = tcp_port(url) else {
        return;
    };
    options.map_sqlx_postgres_pool_opts(move |pool| {
        pool.after_connect(move |_connection, _metadata| {
            Box::pin(async move {
                // A few system calls per open descriptor: off the runtime's workers, since a
                // process serving many sockets has many.
                match tokio::task::spawn_blocking(move || sweep(port)).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(error)) => warn_once(&error),
                    Err(error) => warn_once(&std::io::Error::other(error)),
                }
                Ok(())
            })
        })
    });
}

/// Logs the first failure of the process's sweeps, and only that one.
pub fn warn_once(error: &std::io::Error) {
    static WARNED: std::sync::Once = std::sync::Once::new();
    WARNED.call_once(|| {
        tracing::warn!(
            %error,
            "cannot turn on TCP_NODELAY for the PostgreSQL connections: statements larger than \
             the socket's buffer may wait 40 ms for the server's acknowledgement; connecting \
             over the Unix socket avoids it"
        );
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_port_of_a_url_over_tcp_and_none_for_a_socket() {
        assert_eq!(tcp_port("postgres://u:p@127.0.0.1:6543/cdp"), Some(6543));
        assert_eq!(
            tcp_port("postgres://u@db.internal/cdp?sslmode=require"),
            Some(5432)
        );
        assert_eq!(tcp_port("postgresql://[::1]:7000/cdp"), Some(7000));
        assert_eq!(tcp_port("postgresql://[::1]/cdp"), Some(5432));
        assert_eq!(tcp_port("postgres:///cdp?host=/var/run/postgresql"), None);
        assert_eq!(
            tcp_port("postgres://u@localhost/cdp?host=%2Fvar%2Frun%2Fpostgresql"),
            None
        );
        assert_eq!(tcp_port("postgres:///cdp"), None);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_sweep_turns_the_option_on_for_sockets_to_the_port_only() {
        use std::net::{TcpListener, TcpStream};
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let other = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let to_port = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let elsewhere = TcpStream::connect(other.local_addr().unwrap()).unwrap();
        assert!(!to_port.nodelay().unwrap());
        assert!(!elsewhere.nodelay().unwrap());

        let first = sweep(port).unwrap();
        assert!(first.set >= 1, "{first:?}");
        assert!(to_port.nodelay().unwrap());
        assert!(
            !elsewhere.nodelay().unwrap(),
            "a socket to another port is left alone"
        );

        let second = sweep(port).unwrap();
        assert_eq!(second.set, 0);
        assert!(second.already >= 1);
    }
}
