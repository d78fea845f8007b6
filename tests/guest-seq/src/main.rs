//! The guest's half of the real-guest seqpacket checks. Each subcommand is one check against
//! the host (CID 2) and prints one line, `SEQ <check> key=value ...`, for the test to read
//! from the serial console; a failure also prints `FAIL <check> ...` and exits non-zero.
//!
//! usage: vsock-seq-guest <check> <port> [count]
//!
//! The checks that follow `tools/testing/vsock/vsock_test.c` (Linux 6.1) name its case.

use std::io;
use std::mem::MaybeUninit;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use socket2::{Domain, MaybeUninitSlice, MsgHdr, MsgHdrMut, SockAddr, Socket, Type};

const HOST_CID: u32 = 2;
/// Sizes the `sizes` check sends: one byte, a Linux rx buffer's room and one more, a largest
/// packet and one more, and the host's whole buffer.
const SIZES: [usize; 6] = [1, 3732, 3733, 65536, 65537, 262_144];

/// `len` bytes that differ for each `seed`, as the host side computes them.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| ((i as u64 * 31 + seed * 7919) % 251) as u8)
        .collect()
}

/// The size of echo message `i`: mostly small, now and then up to 60 KiB.
fn echo_size(i: u64) -> usize {
    let x = i.wrapping_mul(0x9e37_79b9_7f4a_7c15).rotate_left(17);
    if x.is_multiple_of(16) {
        (x >> 8) as usize % 61_440 + 1
    } else {
        (x >> 8) as usize % 2048 + 1
    }
}

fn connect(port: u32) -> io::Result<Socket> {
    let s = Socket::new(Domain::VSOCK, Type::SEQPACKET, None)?;
    s.connect(&SockAddr::vsock(HOST_CID, port))?;
    Ok(s)
}

fn errno(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(0)
}

/// One message, and the flags `recvmsg` reported: (length or real length, truncated, EOR).
fn recv_msg(s: &Socket, buf: &mut [u8], flags: libc::c_int) -> io::Result<(usize, bool, bool)> {
    // SAFETY: `buf` is initialised memory; viewing it as `MaybeUninit<u8>` only forgets that,
    // and `recvmsg` writes nothing but bytes into it.
    let uninit = unsafe { &mut *(buf as *mut [u8] as *mut [MaybeUninit<u8>]) };
    let mut bufs = [MaybeUninitSlice::new(uninit)];
    let mut msg = MsgHdrMut::new().with_buffers(&mut bufs);
    let n = s.recvmsg(&mut msg, flags)?;
    let f = msg.flags();
    Ok((n, f.is_truncated(), f.is_end_of_record()))
}

fn send_msg(s: &Socket, bytes: &[u8], eor: bool) -> io::Result<usize> {
    let bufs = [io::IoSlice::new(bytes)];
    let msg = MsgHdr::new().with_buffers(&bufs);
    s.sendmsg(&msg, if eor { libc::MSG_EOR } else { 0 })
}

fn fail(check: &str, what: impl std::fmt::Display) -> ExitCode {
    println!("FAIL {check} {what}");
    ExitCode::FAILURE
}

/// Sends a message of each of `SIZES`, checks that one byte more than the host's buffer is
/// refused with ENOMEM, shuts down its sending side, and reads back the host's echo.
fn sizes(port: u32) -> io::Result<String> {
    let s = connect(port)?;
    for (i, &n) in SIZES.iter().enumerate() {
        let sent = send_msg(&s, &pattern(i as u64, n), false)?;
        if sent != n {
            return Ok(format!("short-send={sent}/{n}"));
        }
    }
    let too_big = match send_msg(&s, &vec![0; 262_145], false) {
        Ok(n) => format!("sent {n}"),
        Err(e) => format!("{}", errno(&e)),
    };
    s.shutdown(std::net::Shutdown::Write)?;
    let mut buf = vec![0u8; 300_000];
    let mut lens = Vec::new();
    let mut whole = true;
    loop {
        let (n, trunc, _) = recv_msg(&s, &mut buf, 0)?;
        if n == 0 {
            break;
        }
        let i = lens.len();
        whole &= !trunc && SIZES.get(i) == Some(&n) && buf[..n] == pattern(i as u64, n)[..];
        lens.push(n.to_string());
    }
    Ok(format!(
        "enomem={too_big} got={} whole={}",
        lens.join(","),
        u8::from(whole)
    ))
}

/// `count` messages of varied sizes, each echoed by the host and compared.
fn echo(port: u32, count: u64) -> io::Result<String> {
    let s = connect(port)?;
    let mut buf = vec![0u8; 70_000];
    let mut bytes = 0;
    for i in 0..count {
        let msg = pattern(i, echo_size(i));
        send_msg(&s, &msg, false)?;
        let (n, trunc, _) = recv_msg(&s, &mut buf, 0)?;
        if trunc || buf[..n] != msg[..] {
            return Ok(format!("bad={i} len={} got={n}", msg.len()));
        }
        bytes += n;
    }
    Ok(format!("ok={count} bytes={bytes}"))
}

/// The size of big message `i`: 62 rx buffers' worth, then more than the 66 left posted (a
/// Linux guest refills its ring only below half of it), in turn.
fn big_size(i: u64) -> usize {
    if i.is_multiple_of(2) {
        62 * 3732
    } else {
        250_000
    }
}

/// Receives `count` big messages from the host, each checked whole.
fn big(port: u32, count: u64) -> io::Result<String> {
    let s = connect(port)?;
    let mut buf = vec![0u8; 300_000];
    for i in 0..count {
        let (n, trunc, _) = recv_msg(&s, &mut buf, 0)?;
        if trunc || n != big_size(i) || buf[..n] != pattern(1000 + i, n)[..] {
            return Ok(format!("bad={i} len={n}"));
        }
    }
    Ok(format!("ok={count}"))
}

/// Listens on `port`, takes one connection (a host client of `<uds_path>_seqpacket`), echoes
/// each message until its end of file, then shuts down.
fn serve(port: u32) -> io::Result<String> {
    let l = Socket::new(Domain::VSOCK, Type::SEQPACKET, None)?;
    l.bind(&SockAddr::vsock(libc::VMADDR_CID_ANY, port))?;
    l.listen(1)?;
    println!("SEQ-LISTENING {port}");
    let (s, _) = l.accept()?;
    let mut buf = vec![0u8; 300_000];
    let mut count = 0;
    loop {
        let (n, trunc, _) = recv_msg(&s, &mut buf, 0)?;
        if n == 0 {
            break;
        }
        if trunc {
            return Ok(format!("truncated={count}"));
        }
        send_msg(&s, &buf[..n], false)?;
        count += 1;
    }
    s.shutdown(std::net::Shutdown::Write)?;
    Ok(format!("messages={count}"))
}

/// A seqpacket connect to a port where the host listens with a stream socket.
fn wrong_type(port: u32) -> io::Result<String> {
    let t0 = Instant::now();
    let rc = match connect(port) {
        Ok(_) => "connected".to_string(),
        Err(e) => errno(&e).to_string(),
    };
    Ok(format!("errno={rc} ms={}", t0.elapsed().as_millis()))
}

/// A seqpacket connect while the device offers no seqpacket sockets.
fn no_support(port: u32) -> io::Result<String> {
    let rc = match connect(port) {
        Ok(_) => "connected".to_string(),
        Err(e) => errno(&e).to_string(),
    };
    Ok(format!("errno={rc}"))
}

/// vsock_test "SOCK_SEQPACKET msg bounds": seven one-byte messages each way, the fourth
/// (index 3) sent with MSG_EOR; reports the lengths read and which carried MSG_EOR.
fn bounds(port: u32) -> io::Result<String> {
    let s = connect(port)?;
    for i in 0..7u8 {
        send_msg(&s, &[i], i == 3)?;
    }
    let mut buf = [0u8; 16];
    let mut lens = Vec::new();
    let mut eors = Vec::new();
    for i in 0..7 {
        let (n, _, eor) = recv_msg(&s, &mut buf, 0)?;
        lens.push(n.to_string());
        if eor {
            eors.push(i.to_string());
        }
    }
    Ok(format!(
        "lens={} eor={}",
        lens.join(","),
        if eors.is_empty() {
            "none".to_string()
        } else {
            eors.join(",")
        }
    ))
}

/// vsock_test "SOCK_SEQPACKET MSG_TRUNC flag": a 32-byte message each way; the guest reads
/// the host's into 16 bytes with MSG_TRUNC.
fn trunc(port: u32) -> io::Result<String> {
    let s = connect(port)?;
    send_msg(&s, &[b'x'; 32], false)?;
    let mut buf = [0u8; 16];
    let (n, truncated, _) = recv_msg(&s, &mut buf, libc::MSG_TRUNC)?;
    Ok(format!("ret={n} flag={}", u8::from(truncated)))
}

/// vsock_test "SOCK_SEQPACKET timeout": a read of an idle connection with a 1 s SO_RCVTIMEO
/// fails with EAGAIN after about 1 s; the connection still works afterwards.
fn timeout(port: u32) -> io::Result<String> {
    let s = connect(port)?;
    s.set_read_timeout(Some(Duration::from_secs(1)))?;
    let mut buf = [0u8; 16];
    let t0 = Instant::now();
    let rc = match recv_msg(&s, &mut buf, 0) {
        Ok((n, _, _)) => format!("read {n}"),
        Err(e) => errno(&e).to_string(),
    };
    let ms = t0.elapsed().as_millis();
    // Still usable: tell the host, which answers.
    send_msg(&s, b"done", false)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let (n, _, _) = recv_msg(&s, &mut buf, 0)?;
    Ok(format!(
        "errno={rc} ms={ms} after={}",
        String::from_utf8_lossy(&buf[..n])
    ))
}

/// vsock_test "SOCK_SEQPACKET invalid receive buffer": the host sends two messages of three
/// pages ('a's, then 'b's); the first read goes into three pages whose middle one is unmapped
/// and must fail with ENOMEM (the message is gone), the second gets the 'b's whole.
fn bad_buffer(port: u32) -> io::Result<String> {
    let s = connect(port)?;
    // SAFETY: sysconf has no memory effects.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
    let len = 3 * page;
    // SAFETY: an anonymous private mapping at an address of the kernel's choosing; nothing
    // else refers to it.
    let map = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if map == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the middle page lies inside the mapping just made.
    if unsafe { libc::munmap(map.cast::<u8>().add(page).cast(), page) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel checks every byte it writes against the mappings, and reports the
    // hole as an error instead of touching it; `map` stays mapped (less its middle page).
    let r = unsafe { libc::recv(std::os::fd::AsRawFd::as_raw_fd(&s), map, len, 0) };
    let first = if r < 0 {
        errno(&io::Error::last_os_error()).to_string()
    } else {
        format!("read {r}")
    };
    let mut buf = vec![0u8; len];
    let (n, _, _) = recv_msg(&s, &mut buf, 0)?;
    let all_b = buf[..n].iter().all(|&b| b == b'b');
    // SAFETY: unmaps what is left of the mapping, which nothing uses any more.
    unsafe {
        libc::munmap(map, page);
        libc::munmap(map.cast::<u8>().add(2 * page).cast(), page);
    }
    Ok(format!(
        "first={first} second={n} all_b={}",
        u8::from(all_b)
    ))
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let (Some(check), Some(port)) = (args.get(1), args.get(2).and_then(|p| p.parse().ok())) else {
        eprintln!("usage: vsock-seq-guest <check> <port> [count]");
        return ExitCode::from(2);
    };
    let count = args.get(3).and_then(|c| c.parse().ok()).unwrap_or(1000);
    let result = match check.as_str() {
        "sizes" => sizes(port),
        "echo" => echo(port, count),
        "big" => big(port, count),
        "serve" => serve(port),
        "wrongtype" => wrong_type(port),
        "nosupport" => no_support(port),
        "bounds" => bounds(port),
        "trunc" => trunc(port),
        "timeout" => timeout(port),
        "badbuf" => bad_buffer(port),
        other => return fail(other, "unknown check"),
    };
    match result {
        Ok(line) => {
            println!("SEQ {check} {line}");
            ExitCode::SUCCESS
        }
        Err(e) => fail(check, format!("error={} {e}", errno(&e))),
    }
}
