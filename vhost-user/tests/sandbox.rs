//! The seccomp filter really refuses: each case runs in a child process (this test binary run
//! again for one test), which installs the daemon's own filter on every thread, as the daemon
//! does, then makes one call from a thread started afterwards, as a frontend's worker is. A
//! forbidden call must kill the child with SIGSYS; an allowed one must not; `--sandbox=log`
//! must let it through. The real daemon's threads are checked for the filter in the
//! real-guest suite (`live_stats`), and the file-system confinement there too
//! (`sandbox_confines_connects`).

use std::os::unix::process::ExitStatusExt;
use std::process::Command;

use vsock_vhost_user::sandbox::{filter_system_calls, Mode};

const CASE: &str = "VSOCK_SANDBOX_CASE";

/// Runs `case` in a child under `mode`; returns the signal that ended it, if one did.
fn run_child(test: &str, case: &str, mode: &str) -> Option<i32> {
    let status = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", test, "--nocapture", "--test-threads=1"])
        .env(CASE, format!("{mode}:{case}"))
        .status()
        .unwrap();
    if let Some(sig) = status.signal() {
        return Some(sig);
    }
    assert!(status.success(), "{case} under {mode}: {status}");
    None
}

/// In the child: installs the filter, then makes the case's call on a new thread.
fn child(spec: &str) {
    let (mode, case) = spec.split_once(':').unwrap();
    let mode = if mode == "log" { Mode::Log } else { Mode::On };
    filter_system_calls(mode).expect("install the filter");
    let case = case.to_string();
    std::thread::Builder::new()
        .name("serving".into())
        .spawn(move || call(&case))
        .unwrap()
        .join()
        .unwrap();
    std::process::exit(0);
}

fn call(case: &str) {
    // SAFETY (for each block below): the calls take plain integers or pointers to locals
    // that outlive them; their results are only compared or closed.
    #[allow(unsafe_code)]
    unsafe {
        match case {
            "unix_socket" => {
                let mut fds = [0; 2];
                assert_eq!(
                    libc::socketpair(libc::AF_UNIX, libc::SOCK_STREAM, 0, fds.as_mut_ptr()),
                    0
                );
                assert_eq!(libc::write(fds[0], b"x".as_ptr().cast(), 1), 1);
                let mut b = 0u8;
                assert_eq!(libc::read(fds[1], (&mut b as *mut u8).cast(), 1), 1);
                libc::close(fds[0]);
                libc::close(fds[1]);
                // A thread from this thread, as the daemon makes them.
                std::thread::spawn(|| ()).join().unwrap();
            }
            "inet_socket" => {
                let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
                libc::close(fd);
            }
            "fork" => {
                // A new process: posix_spawn's clone without CLONE_THREAD.
                let _ = Command::new("/bin/true").status();
            }
            "exec_memory" => {
                let p = libc::mmap(
                    std::ptr::null_mut(),
                    4096,
                    libc::PROT_READ | libc::PROT_EXEC,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                );
                libc::munmap(p, 4096);
            }
            "open_file" => {
                // Allowed (recordings are written), unlike the network.
                let _ = std::fs::File::open("/dev/null");
            }
            "ptrace" => {
                // Peeking at a process this one does not trace fails (ESRCH) where it is let
                // through, and attaches nothing: TRACEME here would stop the log-mode child.
                libc::ptrace(libc::PTRACE_PEEKDATA, 1, 0, 0);
            }
            other => panic!("no case {other}"),
        }
    }
}

#[test]
fn forbidden_calls_kill_the_process_and_allowed_ones_do_not() {
    if let Ok(spec) = std::env::var(CASE) {
        child(&spec);
    }
    let test = "forbidden_calls_kill_the_process_and_allowed_ones_do_not";
    for case in ["unix_socket", "open_file"] {
        assert_eq!(run_child(test, case, "on"), None, "{case} was refused");
    }
    for case in ["inet_socket", "fork", "exec_memory", "ptrace"] {
        assert_eq!(
            run_child(test, case, "on"),
            Some(libc::SIGSYS),
            "{case} was not refused"
        );
        // The log mode lets it through (the kernel logs it).
        assert_eq!(
            run_child(test, case, "log"),
            None,
            "{case} refused under log"
        );
    }
}
