//! twinpaged: the broker of every preloaded process on the host, so that
//! pages merge across processes (between guests) as with kernel KSM.
//!
//! It listens on `$TWINPAGE_SOCKET` (default `$TWINPAGE_DIR/twinpaged.sock`)
//! and publishes its counters and takes tunables in the tree at
//! `$TWINPAGE_DIR`, beside its agents. Stopping it (SIGTERM, or a crash)
//! leaves every guest running with its merged pages; agents carry on alone
//! and connect again when it is back.

mod view;

use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use nix::fcntl::{Flock, FlockArg};
use twinpage::broker::server::{self, Daemon};
use twinpage::broker::Limits;
use twinpage::statsfs::{ProcessFlags, StatsTree, StatsTreeOptions};

/// twinpaged: shares merged pages across the processes that preload libtwinpage.so.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// The stats tree root (as the agents' TWINPAGE_DIR).
    #[arg(long, env = "TWINPAGE_DIR", default_value = "/run/twinpage")]
    dir: PathBuf,
    /// The socket agents connect to [default: DIR/twinpaged.sock].
    #[arg(long, env = "TWINPAGE_SOCKET")]
    socket: Option<PathBuf>,
    /// Permissions of the socket, in octal. The default lets only this
    /// daemon's user (and root) connect; 0666 lets every user's processes
    /// in, each in the domain of its uid.
    #[arg(long, default_value = "600", value_parser = parse_mode)]
    socket_mode: u32,
    /// Connected agents at most (one thread each); more are refused with
    /// the reason and merge their own pages alone.
    #[arg(long, default_value_t = Limits::default().max_agents as u32, value_parser = clap::value_parser!(u32).range(1..))]
    max_agents: u32,
    /// Unstable-tree entries (proposed pages not matched yet) per agent at
    /// most; beyond it the agent's oldest are dropped. The default covers
    /// every page of a 16 GiB guest.
    #[arg(long, default_value_t = Limits::default().max_proposals as u64, value_parser = clap::value_parser!(u64).range(1..=1 << 32))]
    max_proposals: u64,
    /// A tmpfs directory for the stores (one unnamed file per domain)
    /// instead of memfds: a size-limited mount bounds them; when it is
    /// full, new merges wait for space (`twinpage_store_full`).
    #[arg(long, env = "TWINPAGE_STORE_DIR")]
    store_dir: Option<PathBuf>,
    /// Never raise vm.max_map_count. By default, running as root, the
    /// daemon raises it to what its agents' registered memory can need
    /// (each merged page that stands alone costs a mapping) and leaves it
    /// so at exit; it never lowers it.
    #[arg(long)]
    keep_max_map_count: bool,
    /// Write per-process figures for Prometheus (pid and guest-name labels)
    /// to DIR/twinpage.prom every 2 s, for node_exporter's textfile
    /// collector (Debian's: /var/lib/prometheus/node-exporter).
    #[arg(long)]
    textfile_dir: Option<PathBuf>,
    /// Mount the tree's kernel/mm/ksm at DIR/kernel/mm/ksm as a filesystem
    /// (FUSE) that answers as sysfs does: a counter is taken at the read and
    /// never torn, a bad write fails in write(2) with the kernel's errno, an
    /// accepted one returns once every process has it (run=2: all
    /// unmerged). For programs that are not preloaded: `cat`, `echo`,
    /// node_exporter --path.sysfs=DIR.
    #[arg(long)]
    sysfs: Option<PathBuf>,
}

fn parse_mode(s: &str) -> Result<u32, String> {
    u32::from_str_radix(s.trim_start_matches("0o"), 8)
        .ok()
        .filter(|m| *m <= 0o777)
        .ok_or_else(|| format!("{s:?} is not an octal mode such as 600"))
}

fn main() {
    // Every TWINPAGE_* variable is checked as the preload checks it; a
    // malformed one stops the daemon before it touches anything.
    let env = match twinpage::envconfig::from_env() {
        Ok(c) => c,
        Err(msg) => {
            eprintln!("twinpaged: invalid environment: {msg}");
            std::process::exit(2);
        }
    };
    env_logger::Builder::from_env(env_logger::Env::new().filter_or("TWINPAGE_LOG", "info")).init();
    let args = Args::parse();
    twinpage::sys::heap::keep_heap_small();
    if let Err(e) = run(&args, &env) {
        eprintln!("twinpaged: {e}");
        std::process::exit(1);
    }
}

/// The lock beside the socket (`<socket>.lock`), held for the daemon's life:
/// a second twinpaged for the same socket stops here, before it publishes or
/// mounts anything. Without it, two started at once both found no socket,
/// both published, and one could take the other's socket for a stale one
/// between its bind and its listen.
fn lock_socket(path: &Path) -> Result<Flock<std::fs::File>, String> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
    }
    let lock = PathBuf::from(format!("{}.lock", path.display()));
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&lock)
        .map_err(|e| format!("cannot open {}: {e}", lock.display()))?;
    Flock::lock(file, FlockArg::LockExclusiveNonblock).map_err(|(_, e)| match e {
        nix::errno::Errno::EWOULDBLOCK => format!("another twinpaged is running on {} (it holds {})", path.display(), lock.display()),
        e => format!("cannot lock {}: {e}", lock.display()),
    })
}

/// Makes sure the socket is this daemon's to take: a live one means another
/// daemon runs there, a stale one (nobody listening) is removed.
fn claim_socket(path: &Path) -> Result<(), String> {
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(format!("another twinpaged is listening on {}", path.display()));
        }
        std::fs::remove_file(path).map_err(|e| format!("cannot remove the stale socket {}: {e}", path.display()))?;
    }
    Ok(())
}

/// Binds the socket (claimed before): agents connect from now on. It is
/// bound under a temporary name beside it, given its mode, and renamed into
/// place, so that nobody ever sees it with the umask's mode (0755 under
/// umask 022: `--socket-mode 666` agents of other uids were refused until
/// the chmod, and a check of the mode could catch it).
fn listen(path: &Path, mode: u32) -> Result<UnixListener, String> {
    let name = path.file_name().ok_or_else(|| format!("{} names no file", path.display()))?;
    let tmp = path.with_file_name(format!(".{}.{}.tmp", name.to_string_lossy(), std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let l = UnixListener::bind(&tmp).map_err(|e| format!("cannot listen on {}: {e}", tmp.display()))?;
    let placed = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))
        .map_err(|e| format!("cannot set the mode of {}: {e}", tmp.display()))
        .and_then(|()| std::fs::rename(&tmp, path).map_err(|e| format!("cannot move {} to {}: {e}", tmp.display(), path.display())));
    if let Err(e) = placed {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(l)
}

fn run(args: &Args, env: &twinpage::envconfig::Config) -> Result<(), String> {
    if !args.dir.is_absolute() {
        return Err(format!("--dir (TWINPAGE_DIR) must be an absolute path, not {:?}", args.dir));
    }
    if args.socket.as_ref().is_some_and(|s| !s.is_absolute()) {
        return Err(format!(
            "--socket (TWINPAGE_SOCKET) must be an absolute path, not {:?}",
            args.socket.as_ref().unwrap_or(&PathBuf::new())
        ));
    }
    let socket = args.socket.clone().unwrap_or_else(|| args.dir.join("twinpaged.sock"));
    twinpage::sys::signals::install_handlers();
    let limits = Limits { max_agents: args.max_agents as usize, max_proposals: args.max_proposals as usize };
    if let Some(d) = &args.store_dir {
        // Checked now, not at the first agent's join.
        twinpage::store::Store::new_in(Some(d)).map_err(|e| format!("--store-dir {}: {e}", d.display()))?;
    }
    let daemon = Arc::new(Daemon::new(limits));
    daemon.broker.lock().store_dir = args.store_dir.clone();
    // TWINPAGE_<ATTR> (checked with the kernel's rules already): this
    // daemon's settings, published to the tree as an agent's would be.
    for (attr, value) in &env.tunables {
        twinpage::statsfs::Source::set_attr(&*daemon, attr, value)
            .map_err(|e| format!("TWINPAGE_{}={value:?} refused ({})", attr.to_ascii_uppercase(), e.name()))?;
    }
    let _lock = lock_socket(&socket)?;
    claim_socket(&socket)?;
    let opts =
        StatsTreeOptions { flags: Some(Arc::new(|_| ProcessFlags { merge_any: false, mergeable: false })), explicit: env.explicit.clone() };
    let tree = Arc::new(
        StatsTree::spawn(daemon.clone(), args.dir.clone(), opts)
            .map_err(|e| format!("cannot publish the stats tree under {}: {e}", args.dir.display()))?,
    );
    let view = match &args.sysfs {
        Some(at) => {
            // A daemon killed with -9 leaves its mount behind, answering
            // ENOTCONN: take it away first.
            if std::fs::metadata(at).is_err_and(|e| e.raw_os_error() == Some(libc::ENOTCONN)) {
                nix::mount::umount2(at, nix::mount::MntFlags::MNT_DETACH)
                    .map_err(|e| format!("--sysfs {}: a stale mount is there and cannot be unmounted: {e}", at.display()))?;
                log::info!("twinpaged: took away the stale mount at {} (a twinpaged killed before)", at.display());
            }
            std::fs::create_dir_all(at).map_err(|e| format!("--sysfs {}: {e}", at.display()))?;
            let t = tree.clone();
            let v = view::mount(&args.dir, at, Box::new(move || t.publish_now()))
                .map_err(|e| format!("--sysfs {}: cannot mount: {e}", at.display()))?;
            log::info!("twinpaged: {}/kernel/mm/ksm answers as sysfs does", at.display());
            Some(v)
        }
        None => None,
    };
    // The socket last: an agent that finds it finds the daemon's tunables
    // in the tree already (and a test waiting for it, a ready daemon).
    let listener = listen(&socket, args.socket_mode)?;
    let stop = Arc::new(AtomicBool::new(false));
    let (d, s) = (daemon.clone(), stop.clone());
    let acceptor = std::thread::Builder::new()
        .name("twinpaged-accept".into())
        .spawn(move || server::serve(d, listener, s))
        .map_err(|e| format!("cannot start the accept thread: {e}"))?;
    log::info!("twinpaged: listening on {} (tree {})", socket.display(), args.dir.display());
    let reader = twinpage::statsfs::Tree::at(args.dir.clone());
    let mut keeper = twinpage::maplimit::Keeper::new(args.keep_max_map_count);
    let mut pacer = twinpage::pacing::Pacer::new();
    let mut ticks = 0u32;
    while !twinpage::sys::signals::interrupted() {
        if ticks.is_multiple_of(5) {
            // The agents' files are read only while the advisor is on.
            let on = daemon.broker.lock().tunables.advisor_mode() == twinpage::AdvisorMode::ScanTime;
            let processes = if on { reader.processes().unwrap_or_default() } else { Vec::new() };
            pacer.tick(&daemon.broker.lock().tunables, &processes);
        }
        if ticks.is_multiple_of(20) {
            keeper.tick(&reader);
            if let Some(dir) = &args.textfile_dir {
                let text = twinpage::statsfs::prom::render(&reader.processes().unwrap_or_default(), &daemon.broker.lock().domain_figures());
                if let Err(e) = twinpage::statsfs::prom::write(dir, &text) {
                    twinpage::warn_once!("textfile", "twinpaged: cannot write {}/twinpage.prom: {e}", dir.display());
                }
            }
        }
        ticks = ticks.wrapping_add(1);
        std::thread::sleep(Duration::from_millis(100));
    }
    log::info!("twinpaged: stopping; agents go on with their merged pages");
    stop.store(true, Ordering::SeqCst);
    let _ = std::fs::remove_file(&socket);
    drop(view);
    drop(tree);
    drop(acceptor);
    Ok(())
}
