//! The daemon's sandbox, on by default. A guest is hostile, and the daemon parses what it
//! writes into shared memory; if that parsing ever went wrong, the process should be able to
//! do little more than serve vsock. The sandbox has three layers, set up in this order:
//!
//! 1. **A mount namespace** where the file system holds only the directories the daemon
//!    binds, connects and writes in: those of the vhost-user sockets, of `<uds_path>` (and so
//!    of every `<uds_path>_P`), of the recordings and of the stats socket. Each sits at its
//!    own path on an empty tmpfs root, so a path outside them, or a symbolic link planted
//!    in one of them that points outside, names nothing. This is set up while the process
//!    still has a single thread, before any socket is bound. Root gets it directly. Other
//!    users get it inside a user namespace of their own, where the kernel allows one. Where
//!    neither works, it is left out with a warning.
//! 2. **Landlock**, where the kernel has it: no file outside those directories may be
//!    created, written or removed, no TCP port bound or connected, no abstract Unix socket
//!    reached, and no signal sent outside the process. From ABI 9 (Linux 7.1) it also checks
//!    Unix socket connects against the same directories. Landlock restricts the calling thread
//!    and the threads it makes, so it is set up at the same single-threaded point.
//! 3. **A seccomp filter** on every thread, installed once the daemon serves. It allows only
//!    the system calls serving needs ([`allowed`] lists each one and why). Arguments are
//!    checked where that closes a door: sockets are Unix only, new tasks are threads only,
//!    memory is never made executable, and `ioctl`, `fcntl` and `prctl` take only the requests
//!    the daemon makes. Any other call kills the process (`SIGSYS`). `--sandbox=log` lets such
//!    calls through and has the kernel log them instead (the audit log, `dmesg`).
//!
//! `--sandbox=off` turns all three off, for debugging.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fs;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};
use tracing::{info, warn};

/// How much of the sandbox to set up.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// All of it; a system call outside the allow-list kills the process.
    On,
    /// All of it, but a system call outside the allow-list is let through and logged by the
    /// kernel (for finding what a new code path needs).
    Log,
    /// None of it.
    Off,
}

/// What the file-system layers left the process, for the log and the tests.
#[derive(Clone, Debug, Default)]
pub struct Confinement {
    /// The directories the process still sees (empty if there is no mount namespace).
    pub namespace: Vec<PathBuf>,
    /// Why there is no mount namespace, if there is none.
    pub namespace_missing: Option<String>,
    /// The Landlock ABI enforced, if any.
    pub landlock_abi: Option<i32>,
    /// Whether Landlock checks Unix socket connects (ABI 9 on).
    pub landlock_unix_connects: bool,
}

/// A path the daemon uses, made absolute through its directory's real path, so that the path
/// means the same thing in the namespace, where the working directory is `/`.
///
/// # Errors
///
/// The directory does not exist.
pub fn resolve(path: &Path) -> io::Result<PathBuf> {
    let name = path.file_name().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} names no file", path.display()),
        )
    })?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let dir = fs::canonicalize(dir).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("the directory of {}: {e}", path.display()),
        )
    })?;
    Ok(dir.join(name))
}

/// Sets up the mount namespace and Landlock for a daemon that binds, connects and removes
/// sockets in `socket_dirs` and writes files in `write_dirs` (absolute and real, as
/// [`resolve`] makes them). Must be called while the process has one thread.
///
/// # Errors
///
/// A step the kernel allowed but that failed half-way, which leaves the process in no state
/// to serve. Steps the kernel refuses outright are left out with a warning.
pub fn confine_files(socket_dirs: &[PathBuf], write_dirs: &[PathBuf]) -> io::Result<Confinement> {
    let mut dirs: Vec<PathBuf> = socket_dirs.iter().chain(write_dirs).cloned().collect();
    dirs.sort();
    dirs.dedup();
    let mut confinement = Confinement::default();
    match namespace::enter(&dirs) {
        Ok(()) => confinement.namespace = dirs.clone(),
        Err(namespace::Error::Refused(why)) => {
            warn!("sandbox: no mount namespace ({why}); the file system stays visible");
            confinement.namespace_missing = Some(why);
        }
        Err(namespace::Error::Failed(e)) => return Err(e),
    }
    landlock(socket_dirs, write_dirs, &mut confinement)?;
    Ok(confinement)
}

fn landlock(
    socket_dirs: &[PathBuf],
    write_dirs: &[PathBuf],
    confinement: &mut Confinement,
) -> io::Result<()> {
    use landlock::{
        Access, AccessFs, AccessNet, CompatLevel, Compatible, LandlockStatus, PathBeneath, PathFd,
        Ruleset, RulesetAttr, RulesetCreatedAttr, RulesetStatus, Scope, ABI,
    };
    let err = |e: landlock::RulesetError| io::Error::other(format!("Landlock: {e}"));
    // Everything the newest ABI can restrict, as far as this kernel knows it.
    let all = ABI::V9;
    let mut ruleset = Ruleset::default()
        .set_compatibility(CompatLevel::BestEffort)
        .handle_access(AccessFs::from_all(all))
        .map_err(err)?
        .handle_access(AccessNet::from_all(all))
        .map_err(err)?
        .scope(Scope::AbstractUnixSocket | Scope::Signal)
        .map_err(err)?
        .create()
        .map_err(err)?;
    let sockets = AccessFs::MakeSock | AccessFs::RemoveFile | AccessFs::ResolveUnix;
    for dir in socket_dirs {
        let fd = PathFd::new(dir).map_err(|e| io::Error::other(format!("Landlock: {e}")))?;
        ruleset = ruleset
            .add_rule(PathBeneath::new(fd, sockets))
            .map_err(err)?;
    }
    let files = AccessFs::MakeReg | AccessFs::WriteFile | AccessFs::Truncate;
    for dir in write_dirs {
        let fd = PathFd::new(dir).map_err(|e| io::Error::other(format!("Landlock: {e}")))?;
        ruleset = ruleset.add_rule(PathBeneath::new(fd, files)).map_err(err)?;
    }
    let status = ruleset.restrict_self().map_err(err)?;
    match (status.ruleset, status.landlock) {
        (RulesetStatus::NotEnforced, _)
        | (_, LandlockStatus::NotEnabled)
        | (_, LandlockStatus::NotImplemented) => {
            warn!("sandbox: this kernel has no Landlock; the file system is not restricted by it");
        }
        (_, LandlockStatus::Available { effective_abi, .. }) => {
            confinement.landlock_abi = Some(effective_abi as i32);
            confinement.landlock_unix_connects = effective_abi >= ABI::V9;
        }
    }
    Ok(())
}

/// Installs the seccomp filter on every thread of the process (threads made later inherit
/// it).
///
/// # Errors
///
/// The kernel refused the filter (no seccomp, or `no_new_privs` refused).
pub fn filter_system_calls(mode: Mode) -> io::Result<()> {
    if mode == Mode::Off {
        return Ok(());
    }
    for program in programs(mode)? {
        seccompiler::apply_filter_all_threads(&program)
            .map_err(|e| io::Error::other(format!("seccomp: {e}")))?;
    }
    info!(
        mode = ?mode,
        calls = allowed().len(),
        "sandbox: seccomp filter installed on every thread"
    );
    Ok(())
}

/// The filters, compiled: the allow-list, and the one that answers `clone3` with `ENOSYS`
/// (its arguments sit in memory a filter cannot read, and the C library then falls back to
/// `clone`, whose flags it can).
///
/// # Errors
///
/// A rule the compiler refuses (a bug here).
pub fn programs(mode: Mode) -> io::Result<Vec<BpfProgram>> {
    let arch = TargetArch::try_from(std::env::consts::ARCH)
        .map_err(|e| io::Error::other(format!("seccomp: {e}")))?;
    let refuse = match mode {
        Mode::Log => SeccompAction::Log,
        _ => SeccompAction::KillProcess,
    };
    let compile =
        |filter: Result<SeccompFilter, seccompiler::BackendError>| -> io::Result<BpfProgram> {
            let filter = filter.map_err(|e| io::Error::other(format!("seccomp: {e}")))?;
            filter
                .try_into()
                .map_err(|e: seccompiler::BackendError| io::Error::other(format!("seccomp: {e}")))
        };
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for call in allowed() {
        rules.insert(call.number, call.rules()?);
    }
    let allow_list = compile(SeccompFilter::new(
        rules,
        refuse,
        SeccompAction::Allow,
        arch,
    ))?;
    let clone3 = compile(SeccompFilter::new(
        BTreeMap::from([(libc::SYS_clone3, Vec::new())]),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        arch,
    ))?;
    // The clone3 filter first: installing the allow-list takes prctl and seccomp calls,
    // which it then forbids.
    Ok(vec![clone3, allow_list])
}

/// One allowed system call: its number and name, the argument it checks (if any), and why
/// the daemon makes it.
#[derive(Clone, Debug)]
pub struct Allowed {
    /// The call's number on this architecture.
    pub number: i64,
    /// Its name.
    pub name: &'static str,
    /// What its arguments must be, if anything: `(argument, check)`.
    pub only: Option<(u8, Check)>,
    /// Why it is needed.
    pub why: &'static str,
}

/// A check on one argument.
#[derive(Clone, Debug)]
pub enum Check {
    /// One of these values.
    OneOf(&'static [u64]),
    /// These bits set.
    Has(u64),
    /// These bits clear.
    Lacks(u64),
}

impl Allowed {
    fn rules(&self) -> io::Result<Vec<SeccompRule>> {
        let err = |e: seccompiler::BackendError| io::Error::other(format!("seccomp: {e}"));
        let Some((arg, check)) = &self.only else {
            return Ok(Vec::new());
        };
        let cond = |op, value| {
            SeccompCondition::new(*arg, SeccompCmpArgLen::Qword, op, value).map_err(err)
        };
        Ok(match check {
            Check::OneOf(values) => values
                .iter()
                .map(|v| SeccompRule::new(vec![cond(SeccompCmpOp::Eq, *v)?]).map_err(err))
                .collect::<io::Result<_>>()?,
            Check::Has(bits) => {
                vec![
                    SeccompRule::new(vec![cond(SeccompCmpOp::MaskedEq(*bits), *bits)?])
                        .map_err(err)?,
                ]
            }
            Check::Lacks(bits) => {
                vec![SeccompRule::new(vec![cond(SeccompCmpOp::MaskedEq(*bits), 0)?]).map_err(err)?]
            }
        })
    }
}

macro_rules! allow {
    ($name:ident, $why:literal) => {
        Allowed {
            number: libc::$name,
            name: stringify!($name),
            only: None,
            why: $why,
        }
    };
    ($name:ident, $arg:literal, $check:expr, $why:literal) => {
        Allowed {
            number: libc::$name,
            name: stringify!($name),
            only: Some(($arg, $check)),
            why: $why,
        }
    };
}

/// Every system call the serving daemon makes, with why. The list was found by running the
/// whole test suite, the real guests included, on every runtime under `--sandbox=log`, and is
/// checked by running it again under `--sandbox=on`.
pub fn allowed() -> Vec<Allowed> {
    const AF_UNIX: u64 = libc::AF_UNIX as u64;
    vec![
        // Sockets and descriptors: the host sockets, the vhost-user socket, wake-ups.
        allow!(SYS_read, "reads host sockets, wake sockets and eventfds"),
        allow!(
            SYS_write,
            "writes host sockets, wake sockets, eventfds and the log"
        ),
        allow!(
            SYS_readv,
            "vectored reads of host sockets into guest memory"
        ),
        allow!(
            SYS_writev,
            "vectored writes from guest memory to host sockets"
        ),
        allow!(SYS_recvfrom, "reads host sockets"),
        allow!(
            SYS_sendto,
            "writes host sockets (MSG_NOSIGNAL) and the notify socket"
        ),
        allow!(
            SYS_recvmsg,
            "vhost-user messages with their descriptors; seqpacket messages"
        ),
        allow!(
            SYS_sendmsg,
            "vhost-user replies; seqpacket messages; sibling sockets"
        ),
        allow!(
            SYS_close,
            "closes sockets, eventfds and unmapped memory's descriptors"
        ),
        allow!(
            SYS_shutdown,
            "half-closes host sockets as the guest shuts down"
        ),
        allow!(
            SYS_socket,
            0,
            Check::OneOf(&[AF_UNIX]),
            "host connects: Unix sockets only"
        ),
        allow!(
            SYS_socketpair,
            0,
            Check::OneOf(&[AF_UNIX]),
            "sibling connections and wake pairs: Unix only"
        ),
        allow!(SYS_connect, "connects to <uds_path>_P and to sibling VMs"),
        allow!(
            SYS_accept4,
            "accepts host clients, frontends and stats clients"
        ),
        allow!(SYS_getsockopt, "socket errors (SO_ERROR) and buffer sizes"),
        allow!(
            SYS_setsockopt,
            "seqpacket send buffers; timeouts of stats clients"
        ),
        allow!(SYS_getsockname, "the listener's address in messages"),
        allow!(SYS_getpeername, "peer addresses in messages"),
        allow!(
            SYS_fcntl,
            1,
            Check::OneOf(&[
                libc::F_GETFL as u64,
                libc::F_SETFL as u64,
                libc::F_GETFD as u64,
                libc::F_SETFD as u64,
                libc::F_DUPFD_CLOEXEC as u64,
            ]),
            "non-blocking and close-on-exec flags; duplicating descriptors"
        ),
        allow!(
            SYS_ioctl,
            1,
            // The request constants' type differs between C libraries.
            #[allow(clippy::unnecessary_cast)]
            Check::OneOf(&[libc::FIONBIO as u64, libc::FIOCLEX as u64]),
            "non-blocking mode (FIONBIO) and close-on-exec (FIOCLEX) only"
        ),
        allow!(SYS_dup, "vhost-user-backend duplicates its eventfds"),
        allow!(
            SYS_eventfd2,
            "vhost-user-backend's exit and wake-up eventfds"
        ),
        allow!(SYS_unlink, "removes the socket paths at exit"),
        allow!(SYS_unlinkat, "removes the socket paths at exit"),
        // Waiting.
        allow!(SYS_epoll_create1, "event loops of new frontend connections"),
        allow!(SYS_epoll_ctl, "registers sockets with the event loops"),
        allow!(SYS_epoll_wait, "the event loops wait"),
        allow!(SYS_epoll_pwait, "the event loops wait"),
        allow!(
            SYS_poll,
            "checks a socket's hang-up at end of file; waits in vhost"
        ),
        allow!(SYS_ppoll, "as poll"),
        allow!(SYS_futex, "locks, channels and thread joins"),
        allow!(SYS_nanosleep, "back-off after a failed accept"),
        allow!(SYS_clock_nanosleep, "back-off after a failed accept"),
        allow!(
            SYS_clock_gettime,
            "the engine's clock and the log's timestamps"
        ),
        allow!(SYS_sched_yield, "spin-then-wait locks"),
        allow!(
            SYS_timerfd_create,
            "smol's reactor (async-io) times its waits"
        ),
        allow!(
            SYS_timerfd_settime,
            "smol's reactor (async-io) times its waits"
        ),
        allow!(
            SYS_timerfd_gettime,
            "smol's reactor (async-io) times its waits"
        ),
        // Memory.
        allow!(
            SYS_mmap,
            2,
            Check::Lacks(libc::PROT_EXEC as u64),
            "guest memory regions and the allocator; never executable"
        ),
        allow!(
            SYS_mprotect,
            2,
            Check::Lacks(libc::PROT_EXEC as u64),
            "thread stacks' guard pages; never executable"
        ),
        allow!(
            SYS_munmap,
            "unmaps guest memory when a frontend goes, and the allocator's"
        ),
        allow!(SYS_mremap, "the allocator grows large buffers"),
        allow!(SYS_madvise, "the allocator returns freed memory"),
        allow!(SYS_brk, "the allocator"),
        // Threads: each frontend connection's worker thread, and the loops' threads.
        allow!(
            SYS_clone,
            0,
            Check::Has(libc::CLONE_THREAD as u64),
            "new threads (a frontend's worker); never a new process"
        ),
        allow!(
            SYS_clone3,
            "answered ENOSYS by the second filter, so threads use clone"
        ),
        allow!(SYS_set_robust_list, "new threads"),
        allow!(SYS_rseq, "new threads"),
        allow!(SYS_sigaltstack, "new threads' signal stacks"),
        allow!(
            SYS_prctl,
            0,
            Check::OneOf(&[libc::PR_SET_NAME as u64, libc::PR_GET_NAME as u64]),
            "thread names only"
        ),
        allow!(SYS_sched_getaffinity, "the C library's thread set-up"),
        allow!(SYS_gettid, "thread ids in the log"),
        allow!(SYS_getpid, "the process's id"),
        allow!(SYS_getrandom, "hash tables' random seeds"),
        allow!(
            SYS_rt_sigprocmask,
            "threads block signals, which go to the main thread"
        ),
        allow!(SYS_rt_sigreturn, "returns from the signal handler"),
        allow!(SYS_rt_sigaction, "signal handling set-up"),
        allow!(
            SYS_tgkill,
            "abort(): a panic that aborts raises SIGABRT on itself"
        ),
        allow!(
            SYS_restart_syscall,
            "a call interrupted by a signal resumes"
        ),
        allow!(SYS_exit, "a thread ends"),
        allow!(SYS_exit_group, "the process ends"),
        // Files.
        allow!(SYS_openat, "the recording files"),
        allow!(SYS_lseek, "the recording files"),
        allow!(SYS_fsync, "the recording is flushed at exit"),
        allow!(SYS_fstat, "descriptor checks"),
        allow!(SYS_newfstatat, "descriptor checks"),
        allow!(SYS_statx, "descriptor checks"),
        allow!(SYS_readlink, "a thread's id from /proc/thread-self"),
        allow!(SYS_readlinkat, "a thread's id from /proc/thread-self"),
    ]
}

/// The mount namespace.
mod namespace {
    use super::*;

    pub(super) enum Error {
        /// The kernel (or the container) does not allow one: go on without.
        Refused(String),
        /// Something failed half-way: the process cannot go on.
        Failed(io::Error),
    }

    fn cstr(p: &Path) -> io::Result<CString> {
        CString::new(p.as_os_str().as_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a path with a NUL byte"))
    }

    fn check(what: &str, r: libc::c_int) -> io::Result<()> {
        if r < 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(e.kind(), format!("{what}: {e}")));
        }
        Ok(())
    }

    fn mount(
        source: Option<&Path>,
        target: &Path,
        fstype: Option<&str>,
        flags: libc::c_ulong,
        what: &str,
    ) -> io::Result<()> {
        let source = source.map(cstr).transpose()?;
        let target = cstr(target)?;
        let fstype = fstype.map(|t| CString::new(t).expect("no NUL"));
        // SAFETY: mount(2) with NUL-terminated strings that live across the call (or null,
        // which the call accepts for these arguments) and no data; it touches no memory of
        // ours besides reading them.
        #[allow(unsafe_code)]
        let r = unsafe {
            libc::mount(
                source.as_ref().map_or(std::ptr::null(), |s| s.as_ptr()),
                target.as_ptr(),
                fstype.as_ref().map_or(std::ptr::null(), |s| s.as_ptr()),
                flags,
                std::ptr::null(),
            )
        };
        check(what, r)
    }

    fn unshare(flags: libc::c_int) -> io::Result<()> {
        // SAFETY: unshare(2) takes no pointers; the process has a single thread, so every
        // part of it moves to the new namespaces.
        #[allow(unsafe_code)]
        let r = unsafe { libc::unshare(flags) };
        check("unshare", r)
    }

    /// Moves the process into a mount namespace whose root holds only `dirs`, each at its own
    /// path (absolute and real).
    pub(super) fn enter(dirs: &[PathBuf]) -> Result<(), Error> {
        if dirs.iter().any(|d| d.parent().is_none()) {
            return Err(Error::Refused(
                "a socket or recording sits in / itself, which cannot be kept alone".into(),
            ));
        }
        // SAFETY: getuid and getgid take nothing and cannot fail.
        #[allow(unsafe_code)]
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        if let Err(e) = unshare(libc::CLONE_NEWNS) {
            // EPERM (and EACCES) both read as PermissionDenied.
            if e.kind() != io::ErrorKind::PermissionDenied {
                return Err(Error::Refused(e.to_string()));
            }
            // Not privileged: a user namespace of our own, mapping us to ourselves.
            unshare(libc::CLONE_NEWUSER | libc::CLONE_NEWNS)
                .map_err(|e| Error::Refused(e.to_string()))?;
            let write = |file: &str, text: String| {
                fs::write(file, text)
                    .map_err(|e| Error::Failed(io::Error::new(e.kind(), format!("{file}: {e}"))))
            };
            write("/proc/self/setgroups", "deny".into())?;
            write("/proc/self/uid_map", format!("{uid} {uid} 1"))?;
            write("/proc/self/gid_map", format!("{gid} {gid} 1"))?;
        }
        let failed = Error::Failed;
        // Nothing mounted from here on reaches the parent namespace.
        mount(
            None,
            Path::new("/"),
            None,
            libc::MS_REC | libc::MS_PRIVATE,
            "make / private",
        )
        .map_err(failed)?;
        // The directories, held open before anything is mounted over them (opened in this
        // namespace: a bind mount takes its source from the caller's own).
        let mut held: Vec<(PathBuf, OwnedFd)> = Vec::new();
        for dir in dirs {
            // Beneath a directory already held: the outer one brings it along.
            if held.iter().any(|(d, _)| dir.starts_with(d)) {
                continue;
            }
            let fd = fs::File::open(dir).map_err(|e| {
                Error::Failed(io::Error::new(e.kind(), format!("{}: {e}", dir.display())))
            })?;
            held.push((dir.clone(), OwnedFd::from(fd)));
        }
        // The new root: a small tmpfs over /tmp (ours alone now; without a /tmp there is no
        // namespace). The directories are reached through the descriptors held, not through
        // their paths, which the tmpfs may hide.
        let stage = Path::new("/tmp");
        if !stage.is_dir() {
            return Err(Error::Refused("no /tmp to build the new root on".into()));
        }
        mount(
            Some(Path::new("tmpfs")),
            stage,
            Some("tmpfs"),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            "mount the new root",
        )
        .map_err(failed)?;
        for (dir, fd) in &held {
            let target = stage.join(dir.strip_prefix("/").unwrap_or(dir));
            fs::create_dir_all(&target).map_err(|e| {
                Error::Failed(io::Error::new(
                    e.kind(),
                    format!("{}: {e}", target.display()),
                ))
            })?;
            let source = PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()));
            // A recursive bind brings the mounts beneath the directory along; of the
            // directory holding the stage (/tmp itself), that would be the new root's tmpfs,
            // hiding what the directory holds, so it comes alone.
            let recursive = if stage.starts_with(dir) {
                0
            } else {
                libc::MS_REC
            };
            mount(
                Some(&source),
                &target,
                None,
                libc::MS_BIND | recursive,
                &format!("bind {}", dir.display()),
            )
            .map_err(failed)?;
        }
        drop(held);
        // The tmpfs becomes the root; the old one is detached.
        std::env::set_current_dir(stage).map_err(failed)?;
        let dot = cstr(Path::new(".")).map_err(failed)?;
        // SAFETY: pivot_root(".", ".") with a NUL-terminated string that outlives the call:
        // the current directory (the tmpfs) becomes the root, the old root stacks on it.
        #[allow(unsafe_code)]
        let r = unsafe { libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) };
        check("pivot_root", r as libc::c_int).map_err(failed)?;
        // SAFETY: umount2 with a NUL-terminated string that outlives the call.
        #[allow(unsafe_code)]
        let r = unsafe { libc::umount2(dot.as_ptr(), libc::MNT_DETACH) };
        check("detach the old root", r).map_err(failed)?;
        std::env::set_current_dir("/").map_err(failed)?;
        // The root itself is read-only: nothing may be made beside the directories.
        mount(
            None,
            Path::new("/"),
            None,
            libc::MS_REMOUNT
                | libc::MS_BIND
                | libc::MS_RDONLY
                | libc::MS_NOSUID
                | libc::MS_NODEV
                | libc::MS_NOEXEC,
            "make the new root read-only",
        )
        .map_err(failed)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_filters_compile_and_every_entry_says_why() {
        for mode in [Mode::On, Mode::Log] {
            assert_eq!(programs(mode).unwrap().len(), 2);
        }
        let list = allowed();
        let mut numbers: Vec<i64> = list.iter().map(|a| a.number).collect();
        numbers.sort();
        numbers.dedup();
        assert_eq!(numbers.len(), list.len(), "a call is listed twice");
        for a in &list {
            assert!(!a.why.is_empty(), "{} says not why", a.name);
        }
    }

    /// The allow-list as `docs/sandbox.md` shows it: one row per call.
    fn allow_list_table() -> String {
        let mut t = String::from("| System call | Arguments | Why |\n|---|---|---|\n");
        for a in allowed() {
            let only = match &a.only {
                None => "any".to_string(),
                Some((arg, Check::OneOf(v))) => {
                    let v: Vec<String> = v.iter().map(|x| format!("{x:#x}")).collect();
                    format!("arg {arg} one of {}", v.join(", "))
                }
                Some((arg, Check::Has(b))) => format!("arg {arg} has bits {b:#x}"),
                Some((arg, Check::Lacks(b))) => format!("arg {arg} lacks bits {b:#x}"),
            };
            let name = a.name.trim_start_matches("SYS_");
            t.push_str(&format!("| `{name}` | {only} | {} |\n", a.why));
        }
        t
    }

    #[test]
    fn the_documented_allow_list_is_current() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/sandbox.md");
        let doc = fs::read_to_string(&path).unwrap();
        let (begin, end) = ("<!-- allow-list begin -->\n", "<!-- allow-list end -->");
        let start = doc.find(begin).expect("begin marker") + begin.len();
        let stop = doc.find(end).expect("end marker");
        let table = allow_list_table();
        if std::env::var_os("VSOCK_UPDATE_DOCS").is_some() {
            fs::write(&path, format!("{}{table}{}", &doc[..start], &doc[stop..])).unwrap();
            return;
        }
        assert!(
            doc[start..stop] == table,
            "{} is stale: VSOCK_UPDATE_DOCS=1 cargo test -p vsock-vhost-user --lib rewrites it",
            path.display()
        );
    }

    #[test]
    fn paths_resolve_through_their_directory() {
        let here = fs::canonicalize(".").unwrap();
        assert_eq!(resolve(Path::new("x.sock")).unwrap(), here.join("x.sock"));
        assert_eq!(
            resolve(Path::new("./src/../x.sock")).unwrap(),
            here.join("x.sock")
        );
        assert!(resolve(Path::new("/no/such/dir/x.sock")).is_err());
    }
}
