//! The trace checker: does tshark read a trace cleanly, and does it see in each packet what
//! the trace means?
//!
//! For a trace file it runs tshark and requires: a clean exit; no malformed packet and no
//! expert item of severity error or worse; every record of ours present as a frame on the
//! same interface; every interface-0 frame dissected as vsock with the fields of our own
//! decoding; and, on each of those frames, the `vsockmon` header agreeing with the virtio
//! header (tshark shows disagreement without complaint). With the Lua dissector of
//! `trace/wireshark`, every interface-1 frame must decode to the kind and connection our
//! reader finds.

use std::path::{Path, PathBuf};
use std::process::Command;

use vsock_trace::event::fields;
use vsock_trace::pcapng::Reader;
use vsock_trace::{EVENTS, PACKETS};

/// The project's Wireshark dissector for the host-event interface.
pub fn dissector() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace")
        .join("trace/wireshark/vsock_events.lua")
}

/// Whether tshark can be run.
pub fn available() -> bool {
    Command::new("tshark")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// The frames of `file` that the display filter `filter` selects, with our Lua dissector.
///
/// # Errors
///
/// tshark failed.
pub fn frames(file: &Path, filter: &str) -> Result<Vec<u64>, String> {
    let out = tshark(
        file,
        true,
        &["-Y", filter, "-T", "fields", "-e", "frame.number"],
    )?;
    out.split_whitespace()
        .map(|n| n.parse().map_err(|e| format!("tshark frame {n:?}: {e}")))
        .collect()
}

fn tshark(file: &Path, lua: bool, args: &[&str]) -> Result<String, String> {
    let mut command = Command::new("tshark");
    if lua {
        command
            .arg("-X")
            .arg(format!("lua_script:{}", dissector().display()));
    }
    let out = command
        .arg("-n")
        .arg("-r")
        .arg(file)
        .args(args)
        .output()
        .map_err(|e| format!("cannot run tshark: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "tshark failed on {}: {}",
            file.display(),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// What a check saw.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Checked {
    /// vsock packets tshark dissected.
    pub packets: usize,
    /// Host events the Lua dissector decoded.
    pub events: usize,
}

/// Checks `file` as described in the module documentation.
///
/// # Errors
///
/// What tshark got wrong, or saw wrong.
pub fn check(file: &Path) -> Result<Checked, String> {
    let bytes = std::fs::read(file).map_err(|e| format!("{}: {e}", file.display()))?;
    // Our own view, record by record: (interface, expected tshark fields).
    let mut ours = Vec::new();
    let mut reader = Reader::new(&bytes).map_err(|e| e.to_string())?;
    while let Some(p) = reader.next_packet().map_err(|e| e.to_string())? {
        ours.push((p.interface, p.data.to_vec()));
    }

    for lua in [false, true] {
        let bad = tshark(
            file,
            lua,
            &[
                "-Y",
                "_ws.malformed || _ws.expert.severity >= error",
                "-T",
                "fields",
                "-e",
                "frame.number",
            ],
        )?;
        if !bad.trim().is_empty() {
            return Err(format!(
                "tshark flags frames {} as malformed or erroneous (dissector: {lua})",
                bad.split_whitespace().collect::<Vec<_>>().join(",")
            ));
        }
    }

    let mut checked = Checked::default();
    let table = tshark(
        file,
        true,
        &[
            "-T",
            "fields",
            "-E",
            "separator=|",
            "-e",
            "frame.number",
            "-e",
            "frame.interface_id",
            "-e",
            "vsock.src_cid",
            "-e",
            "vsock.dst_cid",
            "-e",
            "vsock.src_port",
            "-e",
            "vsock.dst_port",
            "-e",
            "vsock.op",
            "-e",
            "vsock.virtio.src_cid",
            "-e",
            "vsock.virtio.dst_cid",
            "-e",
            "vsock.virtio.src_prot",
            "-e",
            "vsock.virtio.dst_prot",
            "-e",
            "vsock.virtio.op",
            "-e",
            "vsock.virtio.len",
            "-e",
            "vsockev.kind",
            "-e",
            "vsockev.conn",
            "-e",
            "vsockev.guest_port",
        ],
    )?;
    let rows: Vec<Vec<&str>> = table.lines().map(|l| l.split('|').collect()).collect();
    if rows.len() != ours.len() {
        return Err(format!(
            "tshark shows {} frames, the trace holds {} records",
            rows.len(),
            ours.len()
        ));
    }
    for (row, (interface, data)) in rows.iter().zip(&ours) {
        let n = row[0];
        if row[1] != interface.to_string() {
            return Err(format!(
                "frame {n}: on interface {}, not {interface}",
                row[1]
            ));
        }
        if *interface == PACKETS {
            let r = vsock_trace::vsockmon::parse(data).map_err(|e| format!("frame {n}: {e}"))?;
            let h = r.header;
            let want = [
                h.src_cid.get().to_string(),
                h.dst_cid.get().to_string(),
                h.src_port.get().to_string(),
                h.dst_port.get().to_string(),
                vsock_trace::vsockmon::monitor_op(h.op.get()).to_string(),
                h.src_cid.get().to_string(),
                h.dst_cid.get().to_string(),
                h.src_port.get().to_string(),
                h.dst_port.get().to_string(),
                h.op.get().to_string(),
                h.len.get().to_string(),
            ];
            if row[2..13] != want.iter().map(String::as_str).collect::<Vec<_>>()[..] {
                return Err(format!(
                    "frame {n}: tshark reads {:?}, the trace holds {want:?}",
                    &row[2..13]
                ));
            }
            // The two headers, as tshark read them, must agree.
            if row[2..6] != row[7..11] {
                return Err(format!(
                    "frame {n}: the vsockmon and virtio headers disagree"
                ));
            }
            checked.packets += 1;
        } else if *interface == EVENTS {
            let (f, _) = fields(data).map_err(|e| format!("frame {n}: {e}"))?;
            let conn = f.conn.map_or(String::new(), |c| c.to_string());
            if row[13] != f.kind.to_string()
                || row[14] != conn
                || row[15] != f.guest_port.to_string()
            {
                return Err(format!(
                    "frame {n}: the dissector reads kind {} conn {:?} guest port {}, the trace \
                     holds kind {} conn {conn:?} guest port {}",
                    row[13], row[14], row[15], f.kind, f.guest_port
                ));
            }
            checked.events += 1;
        }
    }
    if checked.packets == 0 {
        return Err("no vsock packet in the trace".into());
    }
    Ok(checked)
}
