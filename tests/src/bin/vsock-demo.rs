//! The main demo: starts the `vhost-user-vsock` daemon, boots a Debian guest under QEMU
//! against it, moves 64 MiB each way between the guest's `AF_VSOCK` sockets and host Unix
//! sockets, checks both SHA-256 digests, and prints the throughput and the daemon's counters.
//!
//! `scripts/demo.sh` builds everything first. Usage: `vsock-demo [mio|tokio|smol]`, or
//! `vsock-demo --other BINARY` to run the same session against another vhost-user vsock
//! backend that takes the same flags (`scripts/compare.sh` does, with rust-vmm's
//! `vhost-device-vsock`).

use std::io::Write;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use vsock_tests::guest::{self, Daemon, Image, Vm};

const MIB: u64 = 1 << 20;
const SIZE_MIB: u64 = 64;

/// The backend under test.
enum Backend {
    /// Ours, on this runtime.
    Ours(String),
    /// Another binary with the same flags.
    Other(std::path::PathBuf),
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let backend = match args.as_slice() {
        [] => Backend::Ours("mio".into()),
        [rt] if ["mio", "tokio", "smol"].contains(&rt.as_str()) => Backend::Ours(rt.clone()),
        [flag, path] if flag == "--other" => Backend::Other(path.into()),
        _ => {
            eprintln!("usage: vsock-demo [mio|tokio|smol] | vsock-demo --other BINARY");
            return ExitCode::from(2);
        }
    };
    let image = match Image::find() {
        Ok(image) => image,
        Err(why) => {
            eprintln!("vsock-demo: {why}; scripts/demo.sh builds everything");
            return ExitCode::FAILURE;
        }
    };
    match demo(&image, &backend) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vsock-demo: FAILED: {e}");
            ExitCode::FAILURE
        }
    }
}

fn mb_per_s(bytes: u64, took: Duration) -> f64 {
    bytes as f64 / took.as_secs_f64() / 1e6
}

fn demo(image: &Image, backend: &Backend) -> Result<(), String> {
    let daemon = match backend {
        Backend::Ours(runtime) => {
            println!(
                "daemon:  vhost-user-vsock --runtime {runtime}, guest CID {}",
                guest::GUEST_CID
            );
            Daemon::start(image, runtime)
        }
        Backend::Other(path) => {
            println!(
                "daemon:  {}, guest CID {}",
                path.display(),
                guest::GUEST_CID
            );
            Daemon::start_other(path)
        }
    };
    println!("         vhost-user socket {}", daemon.socket.display());
    println!(
        "         host sockets      {}[_<port>]",
        daemon.uds.display()
    );
    let stop = Arc::new(AtomicBool::new(false));

    // The guest sends to port 5001: a host program listens on <uds>_5001.
    let listener = guest::listen(&daemon.port_path(5001));
    let s = stop.clone();
    let receiver = thread::spawn(move || {
        let mut stream = guest::accept(&listener, &s)?;
        let start = Instant::now();
        let (bytes, digest) = guest::drain(&mut stream).ok()?;
        Some((bytes, digest, start.elapsed()))
    });
    // A host program reaches the guest's port 5002 with CONNECT.
    let (s, uds) = (stop.clone(), daemon.uds.clone());
    let sender = thread::spawn(move || {
        let mut stream = guest::connect(&uds, 5002, &s)?;
        let start = Instant::now();
        let digest = guest::send(&mut stream, SIZE_MIB * MIB, 0xdec0de).ok()?;
        stream.flush().ok()?;
        drop(stream);
        Some((digest, start.elapsed()))
    });

    let script = format!(
        "head -c {bytes} /dev/urandom > /tmp/blob\n\
         echo \"SHA g2h $(sha256sum /tmp/blob | cut -d' ' -f1)\"\n\
         socat -u -b 65536 OPEN:/tmp/blob VSOCK-CONNECT:2:5001\n\
         rm /tmp/blob\n\
         socat -u -b 65536 VSOCK-LISTEN:5002 CREATE:/tmp/in\n\
         echo \"SHA h2g $(sha256sum /tmp/in | cut -d' ' -f1)\"\n\
         t0=$(cut -d' ' -f1 /proc/uptime)\n\
         socat -u OPEN:/dev/null VSOCK-CONNECT:2:5999 2>/tmp/nl.err\n\
         rc=$?\n\
         t1=$(cut -d' ' -f1 /proc/uptime)\n\
         echo \"NOLISTEN rc=$rc t0=$t0 t1=$t1 $(sed -n 's/.*): //p' /tmp/nl.err)\"\n",
        bytes = SIZE_MIB * MIB
    );
    println!("guest:   booting Debian's kernel under QEMU (TCG, no KVM), 1 vCPU ...");
    let booted = Instant::now();
    let vm = Vm::boot(image, &daemon.socket, &script);
    let out = vm.wait(Duration::from_secs(600));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    if out.status != Some(0) {
        return Err(format!("the guest script failed:\n{}", out.serial));
    }
    if let Some(line) = out.line("GUEST-BOOTED ") {
        println!(
            "guest:   {line} (VM ran {:.1} s in all)",
            booted.elapsed().as_secs_f64()
        );
    }

    let (bytes, digest, took) = receiver
        .join()
        .map_err(|_| "receiver panicked")?
        .ok_or("guest->host: nothing arrived")?;
    let guest_digest = out.line("SHA g2h ").unwrap_or("?");
    let same = guest_digest == digest;
    println!(
        "guest -> host: {} MiB in {:.2} s = {:.1} MB/s, sha256 {}",
        bytes / MIB,
        took.as_secs_f64(),
        mb_per_s(bytes, took),
        if same { "matches" } else { "DIFFERS" }
    );
    let (sent, took) = sender
        .join()
        .map_err(|_| "sender panicked")?
        .ok_or("host->guest: could not send")?;
    let guest_digest_h2g = out.line("SHA h2g ").unwrap_or("?");
    let same_h2g = guest_digest_h2g == sent;
    println!(
        "host -> guest: {SIZE_MIB} MiB in {:.2} s = {:.1} MB/s, sha256 {}",
        took.as_secs_f64(),
        mb_per_s(SIZE_MIB * MIB, took),
        if same_h2g { "matches" } else { "DIFFERS" }
    );
    if let Some(line) = out.line("NOLISTEN ") {
        let t = |k| guest::field(line, k).and_then(|v| v.parse::<f64>().ok());
        if let (Some(t0), Some(t1)) = (t("t0"), t("t1")) {
            // What socat said: "Connection reset by peer" for an RST, a timeout otherwise.
            let said = line.splitn(4, ' ').nth(3).unwrap_or("").trim();
            println!(
                "guest connect to a port no host program listens on: {} after {:.2} s",
                if guest::field(line, "rc") == Some("0") {
                    "connected (?)"
                } else if said.is_empty() {
                    "failed"
                } else {
                    said
                },
                t1 - t0
            );
        }
    }

    if let Backend::Other(_) = backend {
        // Not ours: no promise about how it stops or what it prints.
        drop(daemon);
        return if same && same_h2g {
            println!("demo: OK");
            Ok(())
        } else {
            Err("see above".into())
        };
    }
    let (status, log) = daemon.terminate();
    println!("daemon:  stopped with SIGTERM ({status}); its counters:");
    for line in log.lines().filter(|l| l.starts_with("vhost-user-vsock: ")) {
        println!("  {}", &line["vhost-user-vsock: ".len()..]);
    }
    if !(same && same_h2g && status.success()) {
        return Err("see above".into());
    }
    println!("demo: OK");
    Ok(())
}
