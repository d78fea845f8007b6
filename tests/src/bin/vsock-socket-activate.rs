//! Starts a program the way systemd starts a socket-activated service: it binds and listens
//! on each `--listen PATH` (a Unix stream socket), moves them to descriptors 3, 4, ... and
//! replaces itself with the program, whose environment then says `LISTEN_FDS`,
//! `LISTEN_PID` (its own process, as the exec keeps it) and `LISTEN_FDNAMES`. Whatever
//! `NOTIFY_SOCKET` the caller set passes through.
//!
//! ```text
//! vsock-socket-activate [--fds-only] --listen /run/vm3.sock [--listen PATH]... -- PROGRAM [ARGS]...
//! ```
//!
//! With `--fds-only` the descriptors are passed without the variables, as a program that
//! tells its backend `--fd=3` (QEMU's convention) would pass them.
//!
//! The tests use it to run the daemon as its systemd units would; nothing else needs it.

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, ExitCode};

fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1);
    let mut paths = Vec::new();
    let mut program = Vec::new();
    let mut fds_only = false;
    while let Some(arg) = args.next() {
        if arg == "--fds-only" {
            fds_only = true;
        } else if arg == "--listen" {
            match args.next() {
                Some(path) => paths.push(PathBuf::from(path)),
                None => return usage("--listen needs a path"),
            }
        } else if arg == "--" {
            program.extend(args.by_ref());
        } else {
            return usage(&format!("unexpected {}", arg.to_string_lossy()));
        }
    }
    if program.is_empty() {
        return usage("no program to start");
    }
    let mut listeners = Vec::new();
    for path in &paths {
        let _ = std::fs::remove_file(path);
        match UnixListener::bind(path) {
            Ok(l) => listeners.push(l),
            Err(e) => {
                eprintln!("vsock-socket-activate: bind {}: {e}", path.display());
                return ExitCode::FAILURE;
            }
        }
    }
    // Each listener moves to its place from 3 on, without close-on-exec. A listener may sit
    // where a later one belongs: duplicate them all above the range first.
    let count = listeners.len() as i32;
    let mut high = Vec::new();
    for l in &listeners {
        // SAFETY: fcntl(F_DUPFD_CLOEXEC) on a descriptor this process owns has no memory
        // effects; the new descriptor is closed at exec unless moved below.
        let fd = unsafe { libc::fcntl(l.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 3 + count) };
        if fd < 0 {
            eprintln!(
                "vsock-socket-activate: dup: {}",
                std::io::Error::last_os_error()
            );
            return ExitCode::FAILURE;
        }
        high.push(fd);
    }
    for (i, fd) in high.iter().enumerate() {
        // SAFETY: dup2 onto 3 + i replaces whatever was there (one of our listeners, now
        // duplicated above, or nothing): this process is single-threaded and about to exec,
        // so no other owner of that descriptor uses it again. The copy has no close-on-exec.
        if unsafe { libc::dup2(*fd, 3 + i as i32) } < 0 {
            eprintln!(
                "vsock-socket-activate: dup2: {}",
                std::io::Error::last_os_error()
            );
            return ExitCode::FAILURE;
        }
    }
    std::mem::forget(listeners);
    let names: Vec<String> = paths
        .iter()
        .map(|p| {
            p.file_name()
                .map_or(String::from("unknown"), |n| n.to_string_lossy().into())
        })
        .collect();
    let mut command = Command::new(&program[0]);
    command.args(&program[1..]);
    if !fds_only {
        command
            .env("LISTEN_FDS", count.to_string())
            .env("LISTEN_PID", std::process::id().to_string())
            .env("LISTEN_FDNAMES", names.join(":"));
    }
    let error = command.exec();
    eprintln!(
        "vsock-socket-activate: exec {}: {error}",
        program[0].to_string_lossy()
    );
    ExitCode::FAILURE
}

fn usage(why: &str) -> ExitCode {
    eprintln!(
        "vsock-socket-activate: {why}\nusage: vsock-socket-activate [--fds-only] --listen PATH... -- PROGRAM [ARGS]..."
    );
    ExitCode::from(2)
}
