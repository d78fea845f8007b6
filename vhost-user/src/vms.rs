//! The VMs one daemon serves: each one's vhost-user socket, host socket paths, buffer and queue
//! sizes and sibling groups, from the single-VM flags, from repeated `--vm` options, or from a
//! YAML file in the format rust-vmm's vhost-device-vsock reads, and the checks that keep them
//! from colliding.
//!
//! Keys are spelt with `-` or `_` alike, in `--vm` options and in the file (vhost-device-vsock
//! documents both). Every key is checked: an unknown one, a value out of range or a VM that
//! collides with another is an error naming the VM and the key, never a silent default.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};

/// The default tx buffer: Linux's own, four of its largest packets.
pub const DEFAULT_TX_BUFFER_SIZE: u32 = 256 * 1024;
/// The default largest virtqueue.
pub const DEFAULT_QUEUE_SIZE: u16 = 1024;
/// The group a VM is in when none is given: all such VMs may reach one another.
pub const DEFAULT_GROUP: &str = "default";
/// The largest buffer the engine takes: 1 GiB.
const MAX_TX_BUFFER_SIZE: u64 = 1 << 30;

/// One VM's device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmConfig {
    /// The guest's context ID, 3 to 4294967294.
    pub guest_cid: u64,
    /// The vhost-user socket the frontend connects to.
    pub socket: PathBuf,
    /// The base path of the host sockets.
    pub uds_path: PathBuf,
    /// Bytes each connection may have in flight towards its host socket.
    pub tx_buffer_size: u32,
    /// The largest virtqueue the driver may set up: a power of two up to 32768.
    pub queue_size: u16,
    /// The sibling groups: VMs sharing one may connect to each other by CID.
    pub groups: Vec<String>,
    /// Where to record this VM's session, if anywhere.
    pub record: Option<PathBuf>,
}

/// A VM set-up that cannot be served, with what is wrong and where.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError(String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

fn err(msg: impl Into<String>) -> ConfigError {
    ConfigError(msg.into())
}

/// The keys of a VM, in the `_` spelling.
const KEYS: &[&str] = &[
    "guest_cid",
    "socket",
    "uds_path",
    "tx_buffer_size",
    "queue_size",
    "groups",
    "record",
];

/// Keys of vhost-device-vsock's that this daemon does not take, and why.
fn unsupported(key: &str) -> Option<&'static str> {
    match key {
        "forward_cid" | "forward_listen" => Some(
            "vhost-device-vsock's vsock backend relays to the host's own AF_VSOCK; this daemon \
             relays to Unix sockets only (uds-path)",
        ),
        _ => None,
    }
}

/// A value as written: from a `--vm` option always text, from YAML text or a number.
#[derive(Clone, Debug)]
enum Value {
    Text(String),
    Number(i64),
}

/// The raw key/value pairs of one VM, keys normalised to the `_` spelling, before the values
/// are checked.
struct Raw {
    /// Names the VM in messages: `--vm #2` or `vms[1]`.
    name: String,
    values: BTreeMap<String, Value>,
}

impl Raw {
    fn new(name: String) -> Raw {
        Raw {
            name,
            values: BTreeMap::new(),
        }
    }

    fn insert(&mut self, key: &str, value: Value) -> Result<(), ConfigError> {
        let norm = key.trim().replace('-', "_");
        if let Some(why) = unsupported(&norm) {
            return Err(err(format!(
                "{}: `{key}` is not supported: {why}",
                self.name
            )));
        }
        if !KEYS.contains(&norm.as_str()) {
            return Err(err(format!(
                "{}: unknown key `{key}` (known: {})",
                self.name,
                KEYS.join(", ")
            )));
        }
        if self.values.insert(norm, value).is_some() {
            return Err(err(format!("{}: `{key}` is given twice", self.name)));
        }
        Ok(())
    }

    fn text(&self, key: &str) -> Result<Option<&str>, ConfigError> {
        match self.values.get(key) {
            None => Ok(None),
            Some(Value::Text(s)) => Ok(Some(s)),
            Some(Value::Number(_)) => Err(err(format!(
                "{}: `{key}` must be text, not a number",
                self.name
            ))),
        }
    }

    fn number(&self, key: &str, min: u64, max: u64) -> Result<Option<u64>, ConfigError> {
        let n = match self.values.get(key) {
            None => return Ok(None),
            Some(Value::Number(n)) => u64::try_from(*n).ok(),
            Some(Value::Text(s)) => s.trim().parse::<u64>().ok(),
        };
        match n {
            Some(n) if (min..=max).contains(&n) => Ok(Some(n)),
            _ => Err(err(format!(
                "{}: `{key}` must be a whole number from {min} to {max}, not {}",
                self.name,
                self.show(key)
            ))),
        }
    }

    fn show(&self, key: &str) -> String {
        match &self.values[key] {
            Value::Text(s) => format!("{s:?}"),
            Value::Number(n) => n.to_string(),
        }
    }

    fn path(&self, key: &str) -> Result<Option<PathBuf>, ConfigError> {
        Ok(self.text(key)?.map(PathBuf::from))
    }

    fn required_path(&self, key: &str) -> Result<PathBuf, ConfigError> {
        self.path(key)?
            .ok_or_else(|| err(format!("{}: `{key}` is required", self.name)))
    }

    fn into_config(self) -> Result<VmConfig, ConfigError> {
        let guest_cid = self
            .number("guest_cid", 3, 0xFFFF_FFFE)?
            .ok_or_else(|| err(format!("{}: `guest_cid` is required", self.name)))?;
        let socket = self.required_path("socket")?;
        let uds_path = self.required_path("uds_path")?;
        let tx_buffer_size = self
            .number("tx_buffer_size", 1, MAX_TX_BUFFER_SIZE)?
            .map_or(DEFAULT_TX_BUFFER_SIZE, |n| n as u32);
        let queue_size = match self.number("queue_size", 1, 32768)? {
            None => DEFAULT_QUEUE_SIZE,
            Some(n) if n.is_power_of_two() => n as u16,
            Some(n) => {
                return Err(err(format!(
                    "{}: `queue_size` {n} is not a power of two up to 32768",
                    self.name
                )))
            }
        };
        let groups = match self.text("groups")? {
            None => vec![DEFAULT_GROUP.to_string()],
            Some(s) => parse_groups(s).map_err(|e| err(format!("{}: {e}", self.name)))?,
        };
        let record = self.path("record")?;
        Ok(VmConfig {
            guest_cid,
            socket,
            uds_path,
            tx_buffer_size,
            queue_size,
            groups,
            record,
        })
    }
}

/// Group names joined by `+`: each non-empty, of letters, digits, `-`, `_` and `.`, none twice.
pub fn parse_groups(s: &str) -> Result<Vec<String>, String> {
    let mut groups = Vec::new();
    for g in s.split('+') {
        let g = g.trim();
        if g.is_empty() {
            return Err(format!("`groups` {s:?} has an empty group name"));
        }
        if !g
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return Err(format!(
                "`groups`: the name {g:?} may hold only letters, digits, '-', '_' and '.'"
            ));
        }
        if groups.iter().any(|x| x == g) {
            return Err(format!("`groups` names {g:?} twice"));
        }
        groups.push(g.to_string());
    }
    Ok(groups)
}

/// One `--vm` option, `key=value` pairs joined by commas (`index` counts the options from 1,
/// for messages).
pub fn parse_vm_option(s: &str, index: usize) -> Result<VmConfig, ConfigError> {
    let mut raw = Raw::new(format!("--vm #{index}"));
    for pair in s.split(',') {
        if pair.trim().is_empty() {
            return Err(err(format!("{}: an empty `key=value` in {s:?}", raw.name)));
        }
        let Some((key, value)) = pair.split_once('=') else {
            return Err(err(format!("{}: {pair:?} is not `key=value`", raw.name)));
        };
        raw.insert(key, Value::Text(value.to_string()))?;
    }
    raw.into_config()
}

/// A YAML document with a `vms:` list of VMs, each a mapping of the keys `--vm` takes.
pub fn parse_yaml(text: &str) -> Result<Vec<VmConfig>, ConfigError> {
    use yaml_rust2::{Yaml, YamlLoader};
    let docs = YamlLoader::load_from_str(text).map_err(|e| err(format!("not YAML: {e}")))?;
    let doc = match docs.as_slice() {
        [doc] => doc,
        [] => return Err(err("the file is empty: it needs a `vms:` list")),
        _ => return Err(err("the file holds several YAML documents; give one")),
    };
    let Yaml::Hash(top) = doc else {
        return Err(err("the file must be a mapping with a `vms:` list"));
    };
    let mut vms = None;
    for (key, value) in top {
        match key.as_str() {
            Some("vms") => vms = Some(value),
            Some(other) => {
                return Err(err(format!("unknown top-level key `{other}` (only `vms`)")))
            }
            None => return Err(err("a top-level key is not text")),
        }
    }
    let Some(Yaml::Array(list)) = vms else {
        return Err(err("`vms:` must be a list of VMs"));
    };
    if list.is_empty() {
        return Err(err("`vms:` lists no VM"));
    }
    let mut out = Vec::with_capacity(list.len());
    for (i, vm) in list.iter().enumerate() {
        let mut raw = Raw::new(format!("vms[{i}]"));
        let Yaml::Hash(map) = vm else {
            return Err(err(format!("{}: must be a mapping of keys", raw.name)));
        };
        for (key, value) in map {
            let Some(key) = key.as_str() else {
                return Err(err(format!("{}: a key is not text", raw.name)));
            };
            let value = match value {
                Yaml::String(s) => Value::Text(s.clone()),
                Yaml::Integer(n) => Value::Number(*n),
                Yaml::Real(r) => Value::Text(r.clone()),
                Yaml::Boolean(b) => Value::Text(b.to_string()),
                _ => {
                    return Err(err(format!(
                        "{}: `{key}` must be text or a number",
                        raw.name
                    )))
                }
            };
            raw.insert(key, value)?;
        }
        out.push(raw.into_config()?);
    }
    Ok(out)
}

/// Checks that the VMs can be served side by side: at least one, no CID, vhost-user socket or
/// host path given twice or taken by another VM's host paths, every path short enough for a
/// Unix socket.
pub fn validate(vms: &[VmConfig]) -> Result<(), ConfigError> {
    if vms.is_empty() {
        return Err(err("no VM to serve"));
    }
    let mut cids = HashMap::new();
    for (i, vm) in vms.iter().enumerate() {
        if let Some(j) = cids.insert(vm.guest_cid, i) {
            return Err(err(format!(
                "VMs {} and {} both have guest CID {}",
                j + 1,
                i + 1,
                vm.guest_cid
            )));
        }
        check_socket_path(i, "socket", &vm.socket)?;
        check_socket_path(i, "uds_path", &vm.uds_path)?;
    }
    // Every path a VM binds or connects to, named for messages.
    let mut paths: Vec<(usize, &'static str, &Path)> = Vec::new();
    for (i, vm) in vms.iter().enumerate() {
        paths.push((i, "socket", &vm.socket));
        paths.push((i, "uds_path", &vm.uds_path));
        if let Some(r) = &vm.record {
            paths.push((i, "record", r));
        }
    }
    for (a, &(i, ka, pa)) in paths.iter().enumerate() {
        for &(j, kb, pb) in &paths[a + 1..] {
            if pa == pb {
                return Err(err(format!(
                    "VM {} `{ka}` and VM {} `{kb}` are the same path {}",
                    i + 1,
                    j + 1,
                    pa.display()
                )));
            }
        }
    }
    // A path under another VM's host sockets (`<uds_path>_P`, `<uds_path>_seqpacket`) would
    // be taken for one of them.
    for (i, vm) in vms.iter().enumerate() {
        for &(j, key, p) in &paths {
            if j == i && key == "uds_path" {
                continue;
            }
            if let Some(suffix) = host_suffix(&vm.uds_path, p) {
                return Err(err(format!(
                    "VM {} `{key}` {} is where VM {}'s {suffix} would be",
                    j + 1,
                    p.display(),
                    i + 1
                )));
            }
        }
    }
    Ok(())
}

/// Checks that a path the daemon binds besides the VMs' own (`key`, such as `--stats`) is a
/// socket path and is none of theirs, nor where one of their host sockets would be.
///
/// # Errors
///
/// The path is empty, too long, or clashes with a VM's.
pub fn check_extra_path(vms: &[VmConfig], key: &str, path: &Path) -> Result<(), ConfigError> {
    let len = path.as_os_str().len();
    if len == 0 || len > vsock_host::MAX_SOCKET_PATH {
        return Err(err(format!(
            "{key} {} is {len} bytes; a Unix socket path may have 1 to {}",
            path.display(),
            vsock_host::MAX_SOCKET_PATH
        )));
    }
    for (i, vm) in vms.iter().enumerate() {
        let theirs = [("socket", &vm.socket), ("uds_path", &vm.uds_path)];
        for (k, p) in theirs
            .into_iter()
            .chain(vm.record.iter().map(|r| ("record", r)))
        {
            if p == path {
                return Err(err(format!(
                    "{key} and VM {} `{k}` are the same path {}",
                    i + 1,
                    path.display()
                )));
            }
        }
        if let Some(suffix) = host_suffix(&vm.uds_path, path) {
            return Err(err(format!(
                "{key} {} is where VM {}'s {suffix} would be",
                path.display(),
                i + 1
            )));
        }
    }
    Ok(())
}

/// What `path` would be among the host sockets of `uds_path`, if it is one of them.
fn host_suffix(uds_path: &Path, path: &Path) -> Option<String> {
    let base = uds_path.as_os_str().as_encoded_bytes();
    let p = path.as_os_str().as_encoded_bytes();
    let rest = p.strip_prefix(base)?.strip_prefix(b"_")?;
    if rest == b"seqpacket" {
        return Some("seqpacket listener".into());
    }
    let port = std::str::from_utf8(rest).ok()?.parse::<u32>().ok()?;
    Some(format!("socket for port {port}"))
}

fn check_socket_path(vm: usize, key: &str, path: &Path) -> Result<(), ConfigError> {
    let len = path.as_os_str().len();
    if len == 0 {
        return Err(err(format!("VM {}: `{key}` is empty", vm + 1)));
    }
    // `<uds_path>_4294967295` must fit too.
    let room = if key == "uds_path" {
        vsock_host::MAX_SOCKET_PATH - "_4294967295".len()
    } else {
        vsock_host::MAX_SOCKET_PATH
    };
    if len > room {
        return Err(err(format!(
            "VM {}: `{key}` {} is {len} bytes; a Unix socket path may have {} \
             (for uds_path, room is left for `_<port>`: {room})",
            vm + 1,
            path.display(),
            vsock_host::MAX_SOCKET_PATH
        )));
    }
    Ok(())
}

/// Whether two VMs share a sibling group.
pub fn siblings(a: &VmConfig, b: &VmConfig) -> bool {
    a.groups.iter().any(|g| b.groups.contains(g))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(s: &str) -> Result<VmConfig, ConfigError> {
        parse_vm_option(s, 1)
    }

    #[test]
    fn a_vm_option_takes_both_spellings_and_fills_defaults() {
        let a = vm("guest-cid=4,socket=/tmp/v4.sock,uds-path=/tmp/vm4").unwrap();
        let b = vm("guest_cid=4,socket=/tmp/v4.sock,uds_path=/tmp/vm4").unwrap();
        assert_eq!(a, b);
        assert_eq!(a.tx_buffer_size, DEFAULT_TX_BUFFER_SIZE);
        assert_eq!(a.queue_size, DEFAULT_QUEUE_SIZE);
        assert_eq!(a.groups, ["default"]);
        let c = vm(
            "guest-cid=5,socket=/s,uds-path=/u,tx-buffer-size=32768,queue-size=256,\
                    groups=group1+groupA",
        )
        .unwrap();
        assert_eq!(c.tx_buffer_size, 32768);
        assert_eq!(c.queue_size, 256);
        assert_eq!(c.groups, ["group1", "groupA"]);
    }

    #[test]
    fn bad_vm_options_are_refused_with_the_key_named() {
        for (s, needle) in [
            ("guest-cid=2,socket=/s,uds-path=/u", "guest_cid"),
            ("guest-cid=4294967295,socket=/s,uds-path=/u", "guest_cid"),
            ("guest-cid=x,socket=/s,uds-path=/u", "guest_cid"),
            ("socket=/s,uds-path=/u", "`guest_cid` is required"),
            ("guest-cid=3,uds-path=/u", "`socket` is required"),
            ("guest-cid=3,socket=/s", "`uds_path` is required"),
            (
                "guest-cid=3,socket=/s,uds-path=/u,queue-size=1000",
                "power of two",
            ),
            (
                "guest-cid=3,socket=/s,uds-path=/u,queue-size=65536",
                "queue_size",
            ),
            (
                "guest-cid=3,socket=/s,uds-path=/u,tx-buffer-size=0",
                "tx_buffer_size",
            ),
            (
                "guest-cid=3,socket=/s,uds-path=/u,tx-buffer-size=1073741825",
                "tx_buffer_size",
            ),
            (
                "guest-cid=3,socket=/s,uds-path=/u,groups=a++b",
                "empty group",
            ),
            ("guest-cid=3,socket=/s,uds-path=/u,groups=a+a", "twice"),
            (
                "guest-cid=3,socket=/s,uds-path=/u,groups=a b",
                "may hold only",
            ),
            (
                "guest-cid=3,socket=/s,uds-path=/u,colour=red",
                "unknown key `colour`",
            ),
            ("guest-cid=3,guest_cid=4,socket=/s,uds-path=/u", "twice"),
            ("guest-cid=3,socket=/s,forward-cid=1", "not supported"),
            ("guest-cid=3,socket=/s,uds-path=/u,", "empty"),
            ("guest-cid=3,socket", "not `key=value`"),
        ] {
            let e = vm(s).expect_err(s).to_string();
            assert!(e.contains(needle), "{s}: {e}");
            assert!(e.starts_with("--vm #1"), "{s}: {e}");
        }
    }

    #[test]
    fn the_yaml_format_of_vhost_device_vsock_is_read() {
        let text = "vms:\n    - guest_cid: 3\n      socket: /tmp/vhost3.socket\n      \
                    uds_path: /tmp/vm3.vsock\n      tx_buffer_size: 65536\n      \
                    queue_size: 1024\n      groups: group1+groupA\n    - guest_cid: 4\n      \
                    socket: /tmp/vhost4.socket\n      uds_path: /tmp/vm4.vsock\n";
        let vms = parse_yaml(text).unwrap();
        assert_eq!(vms.len(), 2);
        assert_eq!(vms[0].guest_cid, 3);
        assert_eq!(vms[0].tx_buffer_size, 65536);
        assert_eq!(vms[0].groups, ["group1", "groupA"]);
        assert_eq!(vms[1].uds_path, Path::new("/tmp/vm4.vsock"));
        assert_eq!(vms[1].groups, ["default"]);
        validate(&vms).unwrap();
    }

    #[test]
    fn bad_yaml_is_refused_with_the_place_named() {
        for (text, needle) in [
            ("", "empty"),
            ("vms: [", "not YAML"),
            ("- 1\n", "mapping"),
            ("vms: {}\n", "list"),
            ("vms: []\n", "no VM"),
            ("vm: []\n", "unknown top-level key `vm`"),
            ("vms:\n  - 3\n", "vms[0]: must be a mapping"),
            (
                "vms:\n  - guest_cid: 3\n    socket: /s\n",
                "vms[0]: `uds_path` is required",
            ),
            (
                "vms:\n  - {guest_cid: 3, socket: /s, uds_path: /u, forward-listen: 9001}\n",
                "not supported",
            ),
            (
                "vms:\n  - {guest_cid: 3, socket: 7, uds_path: /u}\n",
                "must be text",
            ),
            (
                "vms:\n  - {guest_cid: -3, socket: /s, uds_path: /u}\n",
                "guest_cid",
            ),
            (
                "vms:\n  - {guest_cid: 3, socket: [a], uds_path: /u}\n",
                "text or a number",
            ),
            ("vms: []\n---\nvms: []\n", "several"),
        ] {
            let e = parse_yaml(text).expect_err(text).to_string();
            assert!(e.contains(needle), "{text:?}: {e}");
        }
    }

    #[test]
    fn colliding_vms_are_refused() {
        let a = vm("guest-cid=3,socket=/run/a.sock,uds-path=/run/a").unwrap();
        let mut b = vm("guest-cid=4,socket=/run/b.sock,uds-path=/run/b").unwrap();
        validate(&[a.clone(), b.clone()]).unwrap();
        let mut same_cid = b.clone();
        same_cid.guest_cid = 3;
        let e = validate(&[a.clone(), same_cid]).unwrap_err().to_string();
        assert!(e.contains("guest CID 3"), "{e}");
        b.socket = a.uds_path.clone();
        let e = validate(&[a.clone(), b.clone()]).unwrap_err().to_string();
        assert!(e.contains("same path"), "{e}");
        b.socket = "/run/b.sock".into();
        b.uds_path = "/run/a_1234".into();
        let e = validate(&[a.clone(), b.clone()]).unwrap_err().to_string();
        assert!(e.contains("socket for port 1234"), "{e}");
        b.uds_path = "/run/a_seqpacket".into();
        let e = validate(&[a.clone(), b.clone()]).unwrap_err().to_string();
        assert!(e.contains("seqpacket listener"), "{e}");
        // A name that merely starts like another is no collision.
        b.uds_path = "/run/a_x".into();
        validate(&[a.clone(), b.clone()]).unwrap();
        b.uds_path = "/run/ab".into();
        validate(&[a.clone(), b]).unwrap();
        let mut long = a.clone();
        long.uds_path = PathBuf::from(format!("/{}", "x".repeat(100)));
        let e = validate(&[long]).unwrap_err().to_string();
        assert!(e.contains("uds_path"), "{e}");
        assert!(validate(&[]).is_err());
    }

    #[test]
    fn vms_sharing_a_group_are_siblings() {
        let a = vm("guest-cid=3,socket=/a,uds-path=/ua,groups=x+y").unwrap();
        let b = vm("guest-cid=4,socket=/b,uds-path=/ub,groups=y").unwrap();
        let c = vm("guest-cid=5,socket=/c,uds-path=/uc").unwrap();
        assert!(siblings(&a, &b));
        assert!(!siblings(&a, &c));
        assert!(!siblings(&b, &c));
    }
}
