//! The Linux kernel's own vsock test program as the judge: `vsock_test` (built from Debian's
//! `linux-source-6.1` by `scripts/vsock-test/build.sh`, nothing of it committed) runs between
//! two real guests on one `vhost-user-vsock` daemon, the server in guest 3 and the client in
//! guest 4, siblings in one group. Its control channel is TCP over a QEMU network link
//! between the two guests (a `-netdev dgram` pair on loopback).
//!
//! Each test case runs on its own (every other one skipped, on both sides), so that one
//! failure cannot hide the cases after it, and the report names every case. Every case must
//! pass, except those in [`NOT_APPLICABLE`], which must fail for the reason given (a case
//! listed there that passes fails this test too, so the list stays true).
//!
//! Ignored, saying why, where QEMU or the guest image is missing, as `tests/guest.rs` is;
//! `scripts/test.sh` provides both, and the program.

use std::collections::BTreeMap;
use std::fs;
use std::net::UdpSocket;
use std::path::PathBuf;
use std::time::Duration;

use vsock_tests::guest::{self, Daemon, Image, Outcome, Vm};

/// Cases that cannot pass through this device, with the reason (README lists them too).
const NOT_APPLICABLE: &[(u32, &str)] = &[(
    6,
    "its server checks MSG_EOR on the one message sent with it; the two devices are joined by \
     a Unix SOCK_SEQPACKET socket pair, which keeps every message boundary but carries no \
     record marks, so EOR is dropped (and counted, seqpacket_eor_dropped) as for a host peer",
)];

fn vsock_test_binary() -> Vec<u8> {
    let path = std::env::var_os("VSOCK_TEST_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/vsock-test/vsock_test")
        });
    fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "no vsock_test at {} ({e}); build it: scripts/vsock-test/build.sh",
            path.display()
        )
    })
}

/// A free UDP port on loopback (free when asked; QEMU binds it a moment later).
fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("a free UDP port")
        .port()
}

/// QEMU arguments for a network device whose frames go to `remote` from `local`, on
/// loopback.
fn link(local: u16, remote: u16, mac: u8) -> Vec<String> {
    vec![
        "-netdev".into(),
        format!(
            "dgram,id=n0,local.type=inet,local.host=127.0.0.1,local.port={local},\
             remote.type=inet,remote.host=127.0.0.1,remote.port={remote}"
        ),
        "-device".into(),
        format!("virtio-net-pci,netdev=n0,mac=52:54:00:00:00:{mac:02x}"),
    ]
}

/// Runs every case on its own, as `mode`: the client retries each until the server's control
/// socket answers.
fn script(mode: &str, address: &str, peer: u64) -> String {
    let control = if mode == "client" {
        "--control-host=10.0.9.1 --control-port=1234"
    } else {
        "--control-port=1234"
    };
    format!(
        r#"ifconfig eth0 {address} netmask 255.255.255.0 up || echo "VT-FAIL no network"
n=$(/guest/vsock_test --list | tail -n +2 | wc -l)
echo "VT-CASES $n"
id=0
while [ $id -lt $n ]; do
    skips=""
    j=0
    while [ $j -lt $n ]; do
        [ $j -eq $id ] || skips="$skips --skip=$j"
        j=$((j + 1))
    done
    tries=0
    while :; do
        timeout 120 /guest/vsock_test --mode={mode} {control} --peer-cid={peer} $skips > /tmp/out 2>&1
        rc=$?
        [ {mode} = server ] && break
        grep -q "Control socket connected" /tmp/out && break
        tries=$((tries + 1))
        [ $tries -lt 600 ] || break
        sleep 0.2
    done
    echo "VT-{mode} id=$id rc=$rc out=$(tr '\n' '|' < /tmp/out)"
    id=$((id + 1))
done
echo "VT-DONE"
"#
    )
}

/// Each case's id, and its exit status and output, from one side's serial console.
fn results(out: &Outcome, mode: &str) -> BTreeMap<u32, (i32, String)> {
    out.lines(&format!("VT-{mode} id="))
        .filter_map(|l| {
            let rest = l.strip_prefix(&format!("VT-{mode} "))?;
            let id: u32 = guest::field(rest, "id")?.parse().ok()?;
            let rc: i32 = guest::field(rest, "rc")?.parse().ok()?;
            let output = rest.split_once("out=").map_or("", |(_, o)| o).to_string();
            Some((id, (rc, output)))
        })
        .collect()
}

fn kernel_vsock_test_between_two_guests(runtime: &str) {
    let image = Image::require();
    let program = vsock_test_binary();
    let _turn = guest::exclusive();
    let (daemon, vms) = Daemon::start_fleet(&image, runtime, &[(3, "vt"), (4, "vt")]);
    let (p3, p4) = (free_udp_port(), free_udp_port());
    let files: &[(&str, &[u8])] = &[("vsock_test", &program)];
    let server = Vm::boot_qemu(
        &image,
        &vms[0].socket,
        &script("server", "10.0.9.1", 4),
        files,
        &link(p3, p4, 3),
    );
    let client = Vm::boot_qemu(
        &image,
        &vms[1].socket,
        &script("client", "10.0.9.2", 3),
        files,
        &link(p4, p3, 4),
    );
    let client = client.wait(Duration::from_secs(1800));
    let server = server.wait(Duration::from_secs(120));
    let exit = daemon.stop();
    assert!(exit.status.success(), "{}", exit.log);
    for out in [&server, &client] {
        assert!(out.line("VT-FAIL").is_none(), "{}", out.serial);
        assert!(out.line("VT-DONE").is_some(), "{}", out.serial);
    }
    let cases: u32 = server
        .line("VT-CASES ")
        .and_then(|n| n.trim().parse().ok())
        .expect("the number of cases");
    let (s, c) = (results(&server, "server"), results(&client, "client"));
    let mut report = format!("vsock_test between two guests on {runtime}:\n");
    let mut wrong = Vec::new();
    for id in 0..cases {
        let (src, sout) = s.get(&id).cloned().unwrap_or((-1, "no result".into()));
        let (crc, cout) = c.get(&id).cloned().unwrap_or((-1, "no result".into()));
        let name = sout
            .split('|')
            .chain(cout.split('|'))
            .find_map(|l| l.strip_prefix(&format!("{id} - ")))
            .map_or("?".to_string(), |n| {
                n.split("...").next().unwrap_or(n).to_string()
            });
        // The case's own line ends in "ok" on both sides, and both exited cleanly.
        let ran = |out: &str| {
            out.split('|')
                .any(|l| l.starts_with(&format!("{id} - ")) && l.ends_with("...ok"))
        };
        let passed = src == 0 && crc == 0 && ran(&sout) && ran(&cout);
        let expected_failure = NOT_APPLICABLE.iter().find(|(i, _)| *i == id);
        let verdict = match (passed, expected_failure) {
            (true, None) => "ok".to_string(),
            (false, Some((_, why))) => format!("not applicable: {why}"),
            (true, Some(_)) => {
                wrong.push(format!("{id} passes but is listed as not applicable"));
                "ok (listed as not applicable)".to_string()
            }
            (false, None) => {
                wrong.push(format!(
                    "{id} {name}: server rc {src}: {sout}\n    client rc {crc}: {cout}"
                ));
                "FAILED".to_string()
            }
        };
        report.push_str(&format!("  {id:2} {name}: {verdict}\n"));
    }
    eprintln!("{report}");
    assert!(wrong.is_empty(), "{report}\n{}", wrong.join("\n"));
}

vsock_tests::on_each_runtime!(kernel_vsock_test_between_two_guests);
