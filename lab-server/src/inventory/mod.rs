//! The hardware inventory: the racks, the hosts in them and how to reach each
//! host's BMC and console, loaded from `inventory.toml`.
//!
//! The file is read in two layers: `raw.rs` mirrors the TOML with serde
//! (unknown fields refused, spans kept), and this module converts it into the
//! validated types below (known racks, unique names, MACs and addresses,
//! parseable addresses, no inline passwords). Every error is reported as
//! `path:line:column: reason`, pointing at the offending value. BMC passwords
//! are only referenced here ([`SecretRef`]); [`SecretRef::resolve`] reads
//! them when they are needed.

mod raw;
mod secret;

pub use secret::{Secret, SecretError, SecretRef};

use crate::types::{Arch, Firmware, Flag, HostName, RackName};
use raw::{RawBmc, RawConsole, RawExpect, RawHost, RawInventory, RawRack};
use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use toml::Spanned;

/// The BMC port when the inventory does not name one (IPMI over LAN, RMCP+).
pub const DEFAULT_BMC_PORT: u16 = 623;

/// Serial console speeds the inventory accepts.
pub const SERIAL_BAUD_RATES: [u32; 5] = [9600, 19200, 38400, 57600, 115200];

/// The serial speed when a serial console does not name one.
pub const DEFAULT_SERIAL_BAUD: u32 = 115200;

/// The validated inventory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inventory {
    /// Racks in file order.
    pub racks: Vec<Rack>,
    /// Hosts in file order.
    pub hosts: Vec<HostSpec>,
    /// Position of each host in `hosts` (lookups by name stay O(1) with
    /// 10,000 hosts).
    by_name: std::collections::HashMap<HostName, usize>,
    /// Position of each rack in `racks`.
    rack_by_name: std::collections::HashMap<RackName, usize>,
    /// Positions in `hosts` of each rack's hosts, in file order (a rack's
    /// hosts without a walk of all of them).
    by_rack: std::collections::HashMap<RackName, Vec<usize>>,
}

/// A rack and the agent that serves it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rack {
    pub name: RackName,
    /// The id of the agent that serves this rack (its token's principal).
    /// `None`: no agent; the rack's hosts are driven by hand (no power
    /// control, no PXE service, reclaimed at once, never unreachable).
    pub agent: Option<String>,
}

/// One host as the inventory describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostSpec {
    pub name: HostName,
    pub arch: Arch,
    pub firmware: Firmware,
    /// Always one of [`Inventory::racks`].
    pub rack: RackName,
    /// The MAC the host PXE-boots from; unique in the inventory.
    pub mac: MacAddr,
    /// A static address, unique in the inventory; `None` for a dynamic one.
    pub ipv4: Option<Ipv4Addr>,
    pub bmc: Option<BmcSpec>,
    pub console: ConsoleSource,
    pub flags: BTreeSet<Flag>,
    /// What a health check expects to see (`[host.expect]`).
    pub expect: Expectations,
}

/// A host's optional hardware expectations, checked by health checks
/// (`crate::health::facts`); unset ones are not checked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Expectations {
    /// Installed memory; passes at 90 % (the kernel keeps some back).
    pub memory_mb: Option<u64>,
    /// Logical CPUs, exactly.
    pub cpus: Option<u32>,
    /// How many disks.
    pub disks: Option<u32>,
    /// Every disk at least this big (GB: 10⁹ bytes).
    pub min_disk_gb: Option<u64>,
}

/// How to reach a host's BMC. Holds a reference to the password, never the
/// password itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BmcSpec {
    pub endpoint: BmcEndpoint,
    pub user: String,
    pub password: SecretRef,
}

/// A BMC's address: an IP address or a DNS name, and a non-zero port.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BmcEndpoint {
    pub host: String,
    pub port: u16,
}

impl fmt::Display for BmcEndpoint {
    /// `host:port`, with an IPv6 address in brackets (`[fd00::1]:623`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// Where a host's console output comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsoleSource {
    /// No console is captured.
    None,
    /// Serial over LAN through the host's BMC.
    IpmiSol,
    /// A serial line attached to the agent's machine.
    Serial { device: PathBuf, baud: u32 },
    /// A TCP stream (`host:port`), e.g. a terminal server or QEMU's `-serial tcp:`.
    Tcp { address: String },
}

pub use lab_types::{InvalidMac, MacAddr};

/// Why the inventory could not be loaded: unreadable, or invalid at
/// `path:line:column` (a TOML syntax error, a wrong or unknown field, or a
/// failed check; 1-based, pointing at the offending value).
pub type InventoryError = lab_types::FileError;

impl Inventory {
    /// Reads and validates the inventory at `path`.
    pub fn load(path: &Path) -> Result<Inventory, InventoryError> {
        let text = std::fs::read_to_string(path).map_err(|source| InventoryError::Read {
            what: "inventory",
            path: path.to_owned(),
            source,
        })?;
        let inventory = Self::parse(&text, path)?;
        tracing::debug!(
            path = %path.display(),
            racks = inventory.racks.len(),
            hosts = inventory.hosts.len(),
            "inventory loaded"
        );
        Ok(inventory)
    }

    /// Validates an inventory's text; `path` is only used in error messages.
    pub fn parse(text: &str, path: &Path) -> Result<Inventory, InventoryError> {
        let cx = Cx {
            text,
            path,
            line_starts: std::iter::once(0)
                .chain(text.match_indices('\n').map(|(i, _)| i + 1))
                .collect(),
        };
        let raw: RawInventory = toml::from_str(text).map_err(|e| cx.toml_error(&e))?;
        cx.inventory(raw)
    }

    pub fn host(&self, name: &HostName) -> Option<&HostSpec> {
        self.position(name).map(|i| &self.hosts[i])
    }

    /// Where `name` is in file order.
    pub fn position(&self, name: &HostName) -> Option<usize> {
        self.by_name.get(name).copied()
    }

    pub fn host_by_mac(&self, mac: &MacAddr) -> Option<&HostSpec> {
        self.hosts.iter().find(|h| &h.mac == mac)
    }

    pub fn rack(&self, name: &RackName) -> Option<&Rack> {
        self.rack_by_name.get(name).map(|&i| &self.racks[i])
    }

    /// The hosts of rack `name`, in file order.
    pub fn hosts_in_rack<'a>(&'a self, name: &RackName) -> impl Iterator<Item = &'a HostSpec> {
        self.by_rack
            .get(name)
            .into_iter()
            .flatten()
            .map(|&i| &self.hosts[i])
    }
}

pub use lab_types::line_column;

/// The text being converted, for turning spans into positioned errors.
struct Cx<'a> {
    text: &'a str,
    path: &'a Path,
    /// Byte offset of each line's start: a value's line is a binary search
    /// (an inventory of 10,000 hosts notes a line per host).
    line_starts: Vec<usize>,
}

/// Where a unique value was first seen.
struct First {
    host: HostName,
    line: usize,
}

impl Cx<'_> {
    fn error(&self, span: Range<usize>, reason: impl fmt::Display) -> InventoryError {
        let (line, column) = line_column(self.text, span.start);
        InventoryError::Invalid {
            path: self.path.to_owned(),
            line,
            column,
            reason: reason.to_string(),
        }
    }

    fn at<T>(&self, value: &Spanned<T>, reason: impl fmt::Display) -> InventoryError {
        self.error(value.span(), reason)
    }

    fn line_of<T>(&self, value: &Spanned<T>) -> usize {
        self.line_starts
            .partition_point(|&start| start <= value.span().start)
    }

    fn toml_error(&self, e: &toml::de::Error) -> InventoryError {
        // Only `message()`: the full `Display` quotes the source line, which
        // may hold a password.
        self.error(e.span().unwrap_or(0..0), e.message().trim_end())
    }

    fn inventory(&self, raw: RawInventory) -> Result<Inventory, InventoryError> {
        let mut rack_lines: HashMap<RackName, usize> = HashMap::new();
        let mut racks = Vec::with_capacity(raw.rack.len());
        for r in &raw.rack {
            let rack = self.rack(r)?;
            if let Some(first) = rack_lines.get(&rack.name) {
                return Err(self.at(
                    &r.name,
                    format!(
                        "duplicate rack name {} (first defined at line {first})",
                        rack.name
                    ),
                ));
            }
            rack_lines.insert(rack.name.clone(), self.line_of(&r.name));
            racks.push(rack);
        }

        let mut names: HashMap<HostName, usize> = HashMap::new();
        let mut macs: HashMap<MacAddr, First> = HashMap::new();
        let mut ips: HashMap<Ipv4Addr, First> = HashMap::new();
        let mut hosts = Vec::with_capacity(raw.host.len());
        for h in &raw.host {
            let host = self.host(h, &rack_lines)?;
            if let Some(first) = names.get(&host.name) {
                return Err(self.at(
                    &h.name,
                    format!(
                        "duplicate host name {} (first defined at line {first})",
                        host.name
                    ),
                ));
            }
            names.insert(host.name.clone(), self.line_of(&h.name));
            if let Some(first) = macs.get(&host.mac) {
                return Err(self.at(
                    &h.mac,
                    format!(
                        "duplicate MAC {} (first used by host {} at line {})",
                        host.mac, first.host, first.line
                    ),
                ));
            }
            let line = self.line_of(&h.mac);
            macs.insert(
                host.mac,
                First {
                    host: host.name.clone(),
                    line,
                },
            );
            if let (Some(ip), Some(raw_ip)) = (host.ipv4, &h.ipv4) {
                if let Some(first) = ips.get(&ip) {
                    return Err(self.at(
                        raw_ip,
                        format!(
                            "duplicate IPv4 address {ip} (first used by host {} at line {})",
                            first.host, first.line
                        ),
                    ));
                }
                let line = self.line_of(raw_ip);
                ips.insert(
                    ip,
                    First {
                        host: host.name.clone(),
                        line,
                    },
                );
            }
            hosts.push(host);
        }
        let by_name = hosts
            .iter()
            .enumerate()
            .map(|(i, h)| (h.name.clone(), i))
            .collect();
        let rack_by_name = racks
            .iter()
            .enumerate()
            .map(|(i, r)| (r.name.clone(), i))
            .collect();
        let mut by_rack: std::collections::HashMap<RackName, Vec<usize>> = Default::default();
        for (i, h) in hosts.iter().enumerate() {
            by_rack.entry(h.rack.clone()).or_default().push(i);
        }
        Ok(Inventory {
            racks,
            hosts,
            by_name,
            rack_by_name,
            by_rack,
        })
    }

    fn rack(&self, r: &RawRack) -> Result<Rack, InventoryError> {
        let name = RackName::new(r.name.get_ref().as_str()).map_err(|e| self.at(&r.name, e))?;
        let agent = match &r.agent {
            None => None,
            Some(spanned) => {
                let agent = spanned.get_ref();
                if agent.is_empty() || agent.chars().any(|c| c.is_whitespace() || c.is_control()) {
                    return Err(self.at(
                        spanned,
                        format!("invalid agent id {agent:?}: must be non-empty, without spaces"),
                    ));
                }
                Some(agent.clone())
            }
        };
        Ok(Rack { name, agent })
    }

    fn host(
        &self,
        h: &RawHost,
        racks: &HashMap<RackName, usize>,
    ) -> Result<HostSpec, InventoryError> {
        let name = HostName::new(h.name.get_ref().as_str()).map_err(|e| self.at(&h.name, e))?;
        let arch = Arch::from_str(h.arch.get_ref()).map_err(|e| self.at(&h.arch, e))?;
        let firmware = parse_firmware(h.firmware.get_ref()).map_err(|e| self.at(&h.firmware, e))?;
        if arch == Arch::Aarch64 && firmware == Firmware::Bios {
            return Err(self.at(
                &h.firmware,
                "aarch64 hosts boot with UEFI; firmware \"bios\" is only for x86_64",
            ));
        }
        let rack = RackName::new(h.rack.get_ref().as_str()).map_err(|e| self.at(&h.rack, e))?;
        if !racks.contains_key(&rack) {
            return Err(self.at(
                &h.rack,
                format!("unknown rack {rack} (no [[rack]] has that name)"),
            ));
        }
        let mac = MacAddr::from_str(h.mac.get_ref()).map_err(|e| self.at(&h.mac, e))?;
        let ipv4 = h.ipv4.as_ref().map(|ip| self.ipv4(ip)).transpose()?;
        let mut flags = BTreeSet::new();
        for f in &h.flags {
            let flag = Flag::new(f.get_ref().as_str()).map_err(|e| self.at(f, e))?;
            if flags.contains(&flag) {
                return Err(self.at(f, format!("duplicate flag {flag}")));
            }
            flags.insert(flag);
        }
        let bmc = h.bmc.as_ref().map(|b| self.bmc(b)).transpose()?;
        let console = self.console(h.console.as_ref(), bmc.is_some())?;
        let expect = h
            .expect
            .as_ref()
            .map(|e| self.expect(e.get_ref()))
            .transpose()?
            .unwrap_or_default();
        Ok(HostSpec {
            name,
            arch,
            firmware,
            rack,
            mac,
            ipv4,
            bmc,
            console,
            flags,
            expect,
        })
    }

    fn expect(&self, e: &RawExpect) -> Result<Expectations, InventoryError> {
        // A positive whole number of at most `max`.
        let positive = |v: &Option<Spanned<i64>>, what: &str, max: u64| {
            v.as_ref()
                .map(|v| match u64::try_from(*v.get_ref()) {
                    Ok(n) if n > 0 && n <= max => Ok(n),
                    _ => Err(self.at(
                        v,
                        format!(
                            "invalid {what} {}: must be between 1 and {max}",
                            v.get_ref()
                        ),
                    )),
                })
                .transpose()
        };
        let small = u64::from(u32::MAX);
        Ok(Expectations {
            memory_mb: positive(&e.memory_mb, "memory_mb", 1 << 40)?,
            cpus: positive(&e.cpus, "cpus", small)?.map(|n| n as u32),
            disks: positive(&e.disks, "disks", small)?.map(|n| n as u32),
            min_disk_gb: positive(&e.min_disk_gb, "min_disk_gb", 1 << 30)?,
        })
    }

    fn ipv4(&self, raw: &Spanned<String>) -> Result<Ipv4Addr, InventoryError> {
        let ip = Ipv4Addr::from_str(raw.get_ref())
            .map_err(|_| self.at(raw, format!("invalid IPv4 address {:?}", raw.get_ref())))?;
        if ip.is_unspecified() || ip.is_broadcast() || ip.is_multicast() {
            return Err(self.at(
                raw,
                format!("IPv4 address {ip} is not a unicast host address"),
            ));
        }
        Ok(ip)
    }

    fn bmc(&self, spanned: &Spanned<RawBmc>) -> Result<BmcSpec, InventoryError> {
        let b = spanned.get_ref();
        if let Some(p) = &b.password {
            return Err(self.at(
                p,
                "inline BMC passwords are not allowed; use password_env or password_file",
            ));
        }
        let host = b.address.get_ref();
        if !is_host(host) {
            return Err(self.at(
                &b.address,
                format!("invalid BMC address {host:?}: expected an IP address or a DNS name"),
            ));
        }
        let port = match &b.port {
            None => DEFAULT_BMC_PORT,
            Some(p) => match u16::try_from(*p.get_ref()) {
                Ok(port) if port != 0 => port,
                _ => {
                    return Err(self.at(
                        p,
                        format!(
                            "invalid BMC port {}: must be between 1 and 65535",
                            p.get_ref()
                        ),
                    ));
                }
            },
        };
        let password = match (&b.password_env, &b.password_file) {
            (Some(var), None) => {
                let name = var.get_ref();
                if !is_env_var_name(name) {
                    return Err(self.at(var, format!("invalid environment variable name {name:?}")));
                }
                SecretRef::Env(name.clone())
            }
            (None, Some(file)) => {
                let path = PathBuf::from(file.get_ref());
                if !path.is_absolute() {
                    return Err(self.at(
                        file,
                        format!(
                            "password_file {:?} must be an absolute path",
                            file.get_ref()
                        ),
                    ));
                }
                SecretRef::File(path)
            }
            (None, None) => {
                return Err(self.at(spanned, "[host.bmc] needs password_env or password_file"));
            }
            (Some(var), Some(file)) => {
                let second = if var.span().start > file.span().start {
                    var.span()
                } else {
                    file.span()
                };
                return Err(self.error(
                    second,
                    "password_env and password_file are mutually exclusive; give only one",
                ));
            }
        };
        Ok(BmcSpec {
            endpoint: BmcEndpoint {
                host: host.clone(),
                port,
            },
            user: b.user.get_ref().clone(),
            password,
        })
    }

    fn console(
        &self,
        raw: Option<&Spanned<RawConsole>>,
        has_bmc: bool,
    ) -> Result<ConsoleSource, InventoryError> {
        let Some(c) = raw.map(Spanned::get_ref) else {
            return Ok(if has_bmc {
                ConsoleSource::IpmiSol
            } else {
                ConsoleSource::None
            });
        };
        let kind = c.kind.get_ref().as_str();
        let unused = |field: &'static str, span: Option<Range<usize>>| match span {
            Some(span) => Err(self.error(
                span,
                format!("`{field}` is not used by console kind {kind:?}"),
            )),
            None => Ok(()),
        };
        let device = c.device.as_ref().map(Spanned::span);
        let baud = c.baud.as_ref().map(Spanned::span);
        let address = c.address.as_ref().map(Spanned::span);
        match kind {
            "none" => {
                unused("device", device)?;
                unused("baud", baud)?;
                unused("address", address)?;
                Ok(ConsoleSource::None)
            }
            "ipmi-sol" => {
                unused("device", device)?;
                unused("baud", baud)?;
                unused("address", address)?;
                if !has_bmc {
                    return Err(self.at(&c.kind, "console kind \"ipmi-sol\" needs a [host.bmc]"));
                }
                Ok(ConsoleSource::IpmiSol)
            }
            "serial" => {
                unused("address", address)?;
                let Some(device) = &c.device else {
                    return Err(self.at(
                        &c.kind,
                        "serial console needs a device (e.g. device = \"/dev/ttyS0\")",
                    ));
                };
                let path = PathBuf::from(device.get_ref());
                if !path.is_absolute() {
                    return Err(self.at(
                        device,
                        format!(
                            "serial device {:?} must be an absolute path",
                            device.get_ref()
                        ),
                    ));
                }
                let baud = match &c.baud {
                    None => DEFAULT_SERIAL_BAUD,
                    Some(b) => match u32::try_from(*b.get_ref()) {
                        Ok(baud) if SERIAL_BAUD_RATES.contains(&baud) => baud,
                        _ => {
                            return Err(self.at(
                                b,
                                format!(
                                    "unsupported baud rate {} (expected one of {})",
                                    b.get_ref(),
                                    SERIAL_BAUD_RATES.map(|r| r.to_string()).join(", ")
                                ),
                            ));
                        }
                    },
                };
                Ok(ConsoleSource::Serial { device: path, baud })
            }
            "tcp" => {
                unused("device", device)?;
                unused("baud", baud)?;
                let Some(address) = &c.address else {
                    return Err(self.at(
                        &c.kind,
                        "tcp console needs an address (e.g. address = \"127.0.0.1:4555\")",
                    ));
                };
                if !is_host_port(address.get_ref()) {
                    return Err(self.at(
                        address,
                        format!(
                            "invalid console address {:?}: expected host:port",
                            address.get_ref()
                        ),
                    ));
                }
                Ok(ConsoleSource::Tcp {
                    address: address.get_ref().clone(),
                })
            }
            other => Err(self.at(
                &c.kind,
                format!("unknown console kind {other:?} (expected ipmi-sol, serial, tcp or none)"),
            )),
        }
    }
}

fn parse_firmware(s: &str) -> Result<Firmware, String> {
    match s {
        "bios" => Ok(Firmware::Bios),
        "uefi" => Ok(Firmware::Uefi),
        other => Err(format!(
            "unknown firmware {other:?} (expected bios or uefi)"
        )),
    }
}

/// An IP address or a DNS name (letters, digits and `-` in dot-separated
/// labels, the last one not all digits so that `10.0.0.300` is refused).
fn is_host(s: &str) -> bool {
    if s.parse::<IpAddr>().is_ok() {
        return true;
    }
    if s.is_empty() || s.len() > 253 {
        return false;
    }
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    s.split('.').all(label_ok)
        && !s
            .rsplit('.')
            .next()
            .is_some_and(|l| l.bytes().all(|b| b.is_ascii_digit()))
}

/// `host:port` with a non-zero port; an IPv6 host in brackets.
fn is_host_port(s: &str) -> bool {
    let Some((host, port)) = s.rsplit_once(':') else {
        return false;
    };
    let host = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Some(v6) => {
            if v6.parse::<std::net::Ipv6Addr>().is_err() {
                return false;
            }
            v6
        }
        None if host.contains(':') => return false,
        None => host,
    };
    is_host(host) && port.parse::<u16>().is_ok_and(|p| p != 0)
}

fn is_env_var_name(s: &str) -> bool {
    let mut bytes = s.bytes();
    bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHIPPED: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../inventory.toml");

    /// Lines 1-3: rack `rack1`.
    const RACK1: &str = "[[rack]]\nname = \"rack1\"\nagent = \"agent-rack1\"\n";

    /// A `[[host]]` of six lines: header, name (value at column 8), arch
    /// (column 8), firmware (column 12), rack (column 8), mac (column 7).
    fn host(name: &str, arch: &str, firmware: &str, rack: &str, mac: &str) -> String {
        format!(
            "[[host]]\nname = \"{name}\"\narch = \"{arch}\"\nfirmware = \"{firmware}\"\n\
             rack = \"{rack}\"\nmac = \"{mac}\"\n"
        )
    }

    /// Rack `rack1` and host `x86-01` (lines 4-9); `extra` starts at line 10.
    fn one_host(extra: &str) -> String {
        let h = host("x86-01", "x86_64", "bios", "rack1", "52:54:00:12:34:01");
        format!("{RACK1}{h}{extra}")
    }

    fn parse(text: &str) -> Result<Inventory, InventoryError> {
        Inventory::parse(text, Path::new("inventory.toml"))
    }

    fn err(text: &str) -> String {
        match parse(text) {
            Ok(_) => panic!("expected an error for:\n{text}"),
            Err(e) => e.to_string(),
        }
    }

    fn mac(s: &str) -> MacAddr {
        s.parse().unwrap()
    }

    // ------------------------------------------------------------ valid ----

    #[test]
    fn shipped_inventory_is_valid() {
        let inv = Inventory::load(Path::new(SHIPPED)).unwrap();
        assert_eq!(inv.racks.len(), 2);
        assert_eq!(inv.hosts.len(), 4);
        let names: Vec<_> = inv.hosts.iter().map(|h| h.name.as_str()).collect();
        assert_eq!(names, ["x86-01", "x86-02", "arm-01", "arm-02"]);

        let x1 = inv.host(&HostName::new("x86-01").unwrap()).unwrap();
        assert_eq!((x1.arch, x1.firmware), (Arch::X86_64, Firmware::Bios));
        assert_eq!(x1.mac, mac("52:54:00:12:34:01"));
        assert_eq!(x1.ipv4, Some(Ipv4Addr::new(198, 18, 0, 11)));
        let flags: Vec<_> = x1.flags.iter().map(Flag::as_str).collect();
        assert_eq!(flags, ["blessed-xen", "iommu"]);
        let bmc = x1.bmc.as_ref().unwrap();
        assert_eq!(bmc.endpoint.to_string(), "198.18.0.111:623");
        assert_eq!(bmc.user, "admin");
        assert_eq!(
            bmc.password,
            SecretRef::Env("LAB_BMC_PASSWORD_X86_01".into())
        );
        assert_eq!(x1.console, ConsoleSource::IpmiSol);
        assert_eq!(
            x1.expect,
            Expectations {
                memory_mb: Some(65536),
                cpus: Some(16),
                disks: Some(2),
                min_disk_gb: Some(400),
            }
        );

        let x2 = inv.host(&HostName::new("x86-02").unwrap()).unwrap();
        assert_eq!(x2.firmware, Firmware::Uefi);
        let bmc = x2.bmc.as_ref().unwrap();
        assert_eq!(bmc.endpoint.to_string(), "bmc-x86-02.lab.example:623");
        assert_eq!(bmc.password, SecretRef::File("/etc/lab/bmc/x86-02".into()));
        assert_eq!(
            x2.console,
            ConsoleSource::Serial {
                device: "/dev/ttyS1".into(),
                baud: 115200
            }
        );

        let a1 = inv.host(&HostName::new("arm-01").unwrap()).unwrap();
        assert_eq!((a1.arch, a1.firmware), (Arch::Aarch64, Firmware::Uefi));
        assert_eq!(a1.rack.as_str(), "rack2");
        assert_eq!(a1.ipv4, None);
        assert_eq!(a1.bmc.as_ref().unwrap().endpoint.port, 6230);
        assert_eq!(
            (a1.expect.memory_mb, a1.expect.cpus, a1.expect.disks),
            (Some(131072), Some(64), None)
        );
        assert_eq!(
            a1.console,
            ConsoleSource::IpmiSol,
            "defaults to ipmi-sol with a bmc"
        );

        let a2 = inv.host_by_mac(&mac("52-54-00-12-34-12")).unwrap();
        assert_eq!(a2.name.as_str(), "arm-02");
        assert_eq!(a2.bmc, None);
        assert_eq!(
            a2.console,
            ConsoleSource::Tcp {
                address: "198.18.1.2:4555".into()
            }
        );

        let rack2 = inv.rack(&RackName::new("rack2").unwrap()).unwrap();
        assert_eq!(rack2.agent.as_deref(), Some("agent-rack2"));
        assert!(inv.host(&HostName::new("nope").unwrap()).is_none());
    }

    #[test]
    fn defaults_and_empty_inventory() {
        let inv = parse("").unwrap();
        assert!(inv.racks.is_empty() && inv.hosts.is_empty());

        let inv = parse(&one_host("")).unwrap();
        let h = &inv.hosts[0];
        assert_eq!(
            (h.ipv4, &h.bmc, &h.console),
            (None, &None, &ConsoleSource::None)
        );
        assert!(h.flags.is_empty());
        assert_eq!(h.expect, Expectations::default());

        let inv = parse(&one_host(
            "[host.bmc]\naddress = \"fd00::1\"\nuser = \"u\"\npassword_env = \"P\"\n\
             [host.console]\nkind = \"serial\"\ndevice = \"/dev/ttyS0\"\n",
        ))
        .unwrap();
        let h = &inv.hosts[0];
        assert_eq!(
            h.bmc.as_ref().unwrap().endpoint.to_string(),
            "[fd00::1]:623"
        );
        assert_eq!(
            h.console,
            ConsoleSource::Serial {
                device: "/dev/ttyS0".into(),
                baud: 115200
            }
        );

        let inv = parse(&one_host("[host.console]\nkind = \"none\"\n")).unwrap();
        assert_eq!(inv.hosts[0].console, ConsoleSource::None);
    }

    #[test]
    fn load_reports_unreadable_file_without_repeating_the_source() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing.toml");
        let e = Inventory::load(&path).unwrap_err();
        assert!(matches!(e, InventoryError::Read { .. }));
        assert_eq!(
            e.to_string(),
            format!("cannot read inventory {}", path.display())
        );
        let source = std::error::Error::source(&e).unwrap().to_string();
        assert!(!e.to_string().contains(&source));
    }

    #[test]
    fn load_reports_the_path_it_was_given() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("inv.toml");
        std::fs::write(&path, one_host("bogus = 1\n")).unwrap();
        let e = Inventory::load(&path).unwrap_err().to_string();
        assert!(
            e.starts_with(&format!("{}:10:1: unknown field `bogus`", path.display())),
            "{e}"
        );
    }

    #[test]
    fn line_column_is_one_based_and_counts_characters() {
        let text = "ab\nçd\n";
        assert_eq!(line_column(text, 0), (1, 1));
        assert_eq!(line_column(text, 2), (1, 3));
        assert_eq!(line_column(text, 3), (2, 1));
        assert_eq!(line_column(text, 5), (2, 2)); // 'd', after the 2-byte 'ç'
        assert_eq!(line_column(text, 100), (3, 1));
    }

    // ------------------------------------------------- serde-level errors ----

    #[test]
    fn unknown_fields_are_refused_everywhere() {
        assert_eq!(
            err(&one_host("bogus = 1\n")),
            "inventory.toml:10:1: unknown field `bogus`, expected one of `name`, `arch`, \
             `firmware`, `rack`, `mac`, `ipv4`, `flags`, `bmc`, `console`, `expect`"
        );
        assert_eq!(
            err(&one_host(
                "[host.expect]
cpus = 2
memory_gb = 4
"
            )),
            "inventory.toml:12:1: unknown field `memory_gb`, expected one of `memory_mb`, \
             `cpus`, `disks`, `min_disk_gb`"
        );
        assert_eq!(
            err("[[rack]]\nname = \"rack1\"\nagent = \"a\"\nagnet = \"b\"\n"),
            "inventory.toml:4:1: unknown field `agnet`, expected `name` or `agent`"
        );
        assert_eq!(
            err("[[racks]]\nname = \"rack1\"\n"),
            "inventory.toml:1:3: unknown field `racks`, expected `rack` or `host`"
        );
        assert_eq!(
            err(&one_host(
                "[host.bmc]\naddress = \"b\"\nuser = \"u\"\npassword_env = \"P\"\nprot = 623\n"
            )),
            "inventory.toml:14:1: unknown field `prot`, expected one of `address`, `port`, \
             `user`, `password`, `password_env`, `password_file`"
        );
        assert_eq!(
            err(&one_host(
                "[host.console]\nkind = \"serial\"\ndev = \"/dev/ttyS0\"\n"
            )),
            "inventory.toml:12:1: unknown field `dev`, expected one of `kind`, `device`, `baud`, \
             `address`"
        );
    }

    #[test]
    fn bad_expectations_are_named() {
        // (host lines from line 10, expected error)
        let cases: &[(&str, &str)] = &[
            (
                "[host.expect]\nmemory_mb = 0\n",
                "inventory.toml:11:13: invalid memory_mb 0: must be between 1 and 1099511627776",
            ),
            (
                "expect = { cpus = -2 }\n",
                "inventory.toml:10:19: invalid cpus -2: must be between 1 and 4294967295",
            ),
            (
                "[host.expect]\ncpus = 2\ndisks = 5000000000\n",
                "inventory.toml:12:9: invalid disks 5000000000: must be between 1 and 4294967295",
            ),
            (
                "[host.expect]\nmin_disk_gb = \"8\"\n",
                "inventory.toml:11:15: invalid type: string \"8\", expected i64",
            ),
        ];
        for (extra, want) in cases {
            assert_eq!(&err(&one_host(extra)), want, "{extra}");
        }
        let inv = parse(&one_host("expect = { disks = 1, min_disk_gb = 8 }\n")).unwrap();
        assert_eq!(
            inv.hosts[0].expect,
            Expectations {
                disks: Some(1),
                min_disk_gb: Some(8),
                ..Expectations::default()
            }
        );
    }

    #[test]
    fn wrong_types_are_refused() {
        assert_eq!(
            err(&one_host("ipv4 = 5\n")),
            "inventory.toml:10:8: invalid type: integer `5`, expected a string"
        );
        assert_eq!(
            err(&one_host("flags = \"iommu\"\n")),
            "inventory.toml:10:9: invalid type: string \"iommu\", expected a sequence"
        );
        assert_eq!(
            err(&one_host(
                "[host.bmc]\naddress = \"b\"\nport = \"623\"\nuser = \"u\"\npassword_env = \"P\"\n"
            )),
            "inventory.toml:12:8: invalid type: string \"623\", expected i64"
        );
    }

    #[test]
    fn missing_fields_point_at_their_table() {
        assert_eq!(
            err(&format!("{RACK1}[[host]]\nname = \"x86-01\"\n")),
            "inventory.toml:4:1: missing field `arch`"
        );
    }

    #[test]
    fn toml_syntax_errors_are_positioned() {
        assert_eq!(
            err(&one_host("ipv4 = \"198.18.0.11\n")),
            "inventory.toml:10:20: invalid basic string, expected `\"`"
        );
    }

    // ------------------------------------------------------------- names ----

    #[test]
    fn invalid_names_are_refused() {
        let h = host("x86 01", "x86_64", "bios", "rack1", "52:54:00:12:34:01");
        assert_eq!(
            err(&format!("{RACK1}{h}")),
            "inventory.toml:5:8: invalid host name \"x86 01\": may only contain letters, digits, \
             '-', '_' and '.'"
        );
        assert_eq!(
            err("[[rack]]\nname = \"-rack\"\nagent = \"a\"\n"),
            "inventory.toml:2:8: invalid rack name \"-rack\": must start with a letter or digit"
        );
        assert_eq!(
            err(&one_host("flags = [\"iommu\", \"\"]\n")),
            "inventory.toml:10:19: invalid flag \"\": must not be empty"
        );
        assert_eq!(
            err(&one_host("flags = [\"iommu\", \"iommu\"]\n")),
            "inventory.toml:10:19: duplicate flag iommu"
        );
        assert_eq!(
            err("[[rack]]\nname = \"rack1\"\nagent = \"agent rack1\"\n"),
            "inventory.toml:3:9: invalid agent id \"agent rack1\": must be non-empty, without \
             spaces"
        );
    }

    #[test]
    fn unknown_arch_firmware_and_console_kind_are_refused() {
        let h = host("x86-01", "riscv64", "bios", "rack1", "52:54:00:12:34:01");
        assert_eq!(
            err(&format!("{RACK1}{h}")),
            "inventory.toml:6:8: unknown arch \"riscv64\" (expected x86_64 or aarch64)"
        );
        let h = host("x86-01", "x86_64", "efi", "rack1", "52:54:00:12:34:01");
        assert_eq!(
            err(&format!("{RACK1}{h}")),
            "inventory.toml:7:12: unknown firmware \"efi\" (expected bios or uefi)"
        );
        assert_eq!(
            err(&one_host("[host.console]\nkind = \"ssh\"\n")),
            "inventory.toml:11:8: unknown console kind \"ssh\" (expected ipmi-sol, serial, tcp or \
             none)"
        );
    }

    #[test]
    fn aarch64_must_be_uefi() {
        let h = host("arm-01", "aarch64", "bios", "rack1", "52:54:00:12:34:11");
        assert_eq!(
            err(&format!("{RACK1}{h}")),
            "inventory.toml:7:12: aarch64 hosts boot with UEFI; firmware \"bios\" is only for \
             x86_64"
        );
    }

    // -------------------------------------------------------- uniqueness ----

    #[test]
    fn duplicate_host_name() {
        let a = host("x86-01", "x86_64", "bios", "rack1", "52:54:00:12:34:01");
        let b = host("x86-01", "x86_64", "uefi", "rack1", "52:54:00:12:34:02");
        assert_eq!(
            err(&format!("{RACK1}{a}{b}")),
            "inventory.toml:11:8: duplicate host name x86-01 (first defined at line 5)"
        );
    }

    #[test]
    fn duplicate_mac_in_any_spelling() {
        let a = host("x86-01", "x86_64", "bios", "rack1", "52:54:00:12:34:01");
        let b = host("x86-02", "x86_64", "uefi", "rack1", "52-54-00-12-34-01");
        assert_eq!(
            err(&format!("{RACK1}{a}{b}")),
            "inventory.toml:15:7: duplicate MAC 52:54:00:12:34:01 (first used by host x86-01 at \
             line 9)"
        );
    }

    #[test]
    fn duplicate_static_ipv4() {
        let a = host("x86-01", "x86_64", "bios", "rack1", "52:54:00:12:34:01");
        let b = host("x86-02", "x86_64", "uefi", "rack1", "52:54:00:12:34:02");
        let ip = "ipv4 = \"198.18.0.11\"\n";
        // a: lines 4-10 (ipv4 at 10); b: lines 11-17 (ipv4 at 17).
        assert_eq!(
            err(&format!("{RACK1}{a}{ip}{b}{ip}")),
            "inventory.toml:17:8: duplicate IPv4 address 198.18.0.11 (first used by host x86-01 \
             at line 10)"
        );
    }

    #[test]
    fn duplicate_rack_name() {
        assert_eq!(
            err(&format!(
                "{RACK1}[[rack]]\nname = \"rack1\"\nagent = \"agent-b\"\n"
            )),
            "inventory.toml:5:8: duplicate rack name rack1 (first defined at line 2)"
        );
    }

    #[test]
    fn unknown_rack() {
        let h = host("x86-01", "x86_64", "bios", "rack9", "52:54:00:12:34:01");
        assert_eq!(
            err(&format!("{RACK1}{h}")),
            "inventory.toml:8:8: unknown rack rack9 (no [[rack]] has that name)"
        );
    }

    // --------------------------------------------------------- addresses ----

    #[test]
    fn bad_mac() {
        let h = host("x86-01", "x86_64", "bios", "rack1", "52:54:00:12:34");
        assert_eq!(
            err(&format!("{RACK1}{h}")),
            "inventory.toml:9:7: invalid MAC address \"52:54:00:12:34\": expected six two-digit \
             hex octets separated by ':' or '-'"
        );
        let h = host("x86-01", "x86_64", "bios", "rack1", "01:00:5e:00:00:01");
        assert_eq!(
            err(&format!("{RACK1}{h}")),
            "inventory.toml:9:7: invalid MAC address \"01:00:5e:00:00:01\": is a multicast address"
        );
        // Non-ASCII where a hex digit belongs: an error at the value, not a
        // panic on a char boundary (it used to stop lab-server).
        let h = host("x86-01", "x86_64", "bios", "rack1", "00:0é:00:00:00:0");
        assert_eq!(
            err(&format!("{RACK1}{h}")),
            "inventory.toml:9:7: invalid MAC address \"00:0é:00:00:00:0\": expected six two-digit \
             hex octets separated by ':' or '-'"
        );
    }

    #[test]
    fn bad_ipv4() {
        assert_eq!(
            err(&one_host("ipv4 = \"198.18.0.300\"\n")),
            "inventory.toml:10:8: invalid IPv4 address \"198.18.0.300\""
        );
        assert_eq!(
            err(&one_host("ipv4 = \"255.255.255.255\"\n")),
            "inventory.toml:10:8: IPv4 address 255.255.255.255 is not a unicast host address"
        );
    }

    #[test]
    fn bad_bmc_address_and_port() {
        let bmc = |address: &str, port: &str| {
            format!(
                "[host.bmc]\naddress = \"{address}\"\nport = {port}\nuser = \"u\"\n\
                 password_env = \"P\"\n"
            )
        };
        assert_eq!(
            err(&one_host(&bmc("198.18.0.1", "0"))),
            "inventory.toml:12:8: invalid BMC port 0: must be between 1 and 65535"
        );
        assert_eq!(
            err(&one_host(&bmc("198.18.0.1", "65536"))),
            "inventory.toml:12:8: invalid BMC port 65536: must be between 1 and 65535"
        );
        assert_eq!(
            err(&one_host(&bmc("198.18.0.300", "623"))),
            "inventory.toml:11:11: invalid BMC address \"198.18.0.300\": expected an IP address \
             or a DNS name"
        );
        assert_eq!(
            err(&one_host(&bmc("bmc_1.lab", "623"))),
            "inventory.toml:11:11: invalid BMC address \"bmc_1.lab\": expected an IP address or \
             a DNS name"
        );
    }

    // --------------------------------------------------------- passwords ----

    #[test]
    fn inline_password_is_refused_without_echoing_it() {
        let text = one_host(
            "[host.bmc]\naddress = \"b\"\nuser = \"u\"\npassword = \"hunter2\"\n\
             password_env = \"P\"\n",
        );
        let e = err(&text);
        assert_eq!(
            e,
            "inventory.toml:13:12: inline BMC passwords are not allowed; use password_env or \
             password_file"
        );
        assert!(!e.contains("hunter2"));
        // Not even when the value is malformed or of another type.
        for bad in [
            "password = hunter2",
            "password = \"hunter2",
            "password = [\"hunter2\"]",
        ] {
            let text = one_host(&format!(
                "[host.bmc]\naddress = \"b\"\nuser = \"u\"\n{bad}\n"
            ));
            let e = err(&text);
            assert!(e.starts_with("inventory.toml:13:"), "{e}");
            assert!(!e.contains("hunter2"), "{e}");
        }
    }

    #[test]
    fn bmc_needs_exactly_one_password_source() {
        assert_eq!(
            err(&one_host("[host.bmc]\naddress = \"b\"\nuser = \"u\"\n")),
            "inventory.toml:10:1: [host.bmc] needs password_env or password_file"
        );
        assert_eq!(
            err(&one_host(
                "[host.bmc]\naddress = \"b\"\nuser = \"u\"\npassword_file = \"/etc/lab/p\"\n\
                 password_env = \"P\"\n"
            )),
            "inventory.toml:14:16: password_env and password_file are mutually exclusive; give \
             only one"
        );
        assert_eq!(
            err(&one_host(
                "[host.bmc]\naddress = \"b\"\nuser = \"u\"\npassword_file = \"etc/lab/p\"\n"
            )),
            "inventory.toml:13:17: password_file \"etc/lab/p\" must be an absolute path"
        );
        assert_eq!(
            err(&one_host(
                "[host.bmc]\naddress = \"b\"\nuser = \"u\"\npassword_env = \"1P\"\n"
            )),
            "inventory.toml:13:16: invalid environment variable name \"1P\""
        );
    }

    // ----------------------------------------------------------- console ----

    #[test]
    fn serial_console_needs_a_device_and_a_sane_baud() {
        assert_eq!(
            err(&one_host(
                "[host.console]\nkind = \"serial\"\nbaud = 9600\n"
            )),
            "inventory.toml:11:8: serial console needs a device (e.g. device = \"/dev/ttyS0\")"
        );
        assert_eq!(
            err(&one_host(
                "[host.console]\nkind = \"serial\"\ndevice = \"/dev/ttyS0\"\nbaud = 115201\n"
            )),
            "inventory.toml:13:8: unsupported baud rate 115201 (expected one of 9600, 19200, \
             38400, 57600, 115200)"
        );
        assert_eq!(
            err(&one_host(
                "[host.console]\nkind = \"serial\"\ndevice = \"ttyS0\"\n"
            )),
            "inventory.toml:12:10: serial device \"ttyS0\" must be an absolute path"
        );
    }

    #[test]
    fn console_fields_must_fit_the_kind() {
        assert_eq!(
            err(&one_host("[host.console]\nkind = \"ipmi-sol\"\n")),
            "inventory.toml:11:8: console kind \"ipmi-sol\" needs a [host.bmc]"
        );
        assert_eq!(
            err(&one_host(
                "[host.console]\nkind = \"tcp\"\naddress = \"h:1\"\nbaud = 9600\n"
            )),
            "inventory.toml:13:8: `baud` is not used by console kind \"tcp\""
        );
        assert_eq!(
            err(&one_host("[host.console]\nkind = \"tcp\"\n")),
            "inventory.toml:11:8: tcp console needs an address (e.g. address = \"127.0.0.1:4555\")"
        );
        assert_eq!(
            err(&one_host(
                "[host.console]\nkind = \"tcp\"\naddress = \"127.0.0.1\"\n"
            )),
            "inventory.toml:12:11: invalid console address \"127.0.0.1\": expected host:port"
        );
        let ok = parse(&one_host(
            "[host.console]\nkind = \"tcp\"\naddress = \"[::1]:4555\"\n",
        ));
        assert_eq!(
            ok.unwrap().hosts[0].console,
            ConsoleSource::Tcp {
                address: "[::1]:4555".into()
            }
        );
    }

    // --------------------------------------------------------- MacAddr ----

    #[test]
    fn mac_round_trips() {
        for (input, shown) in [
            ("52:54:00:12:34:01", "52:54:00:12:34:01"),
            ("52-54-00-AB-cd-EF", "52:54:00:ab:cd:ef"),
            ("02:00:00:00:00:00", "02:00:00:00:00:00"),
        ] {
            let m = mac(input);
            assert_eq!(m.to_string(), shown);
            assert_eq!(mac(shown), m);
        }
        assert_eq!(
            mac("52:54:00:12:34:01").octets(),
            [0x52, 0x54, 0, 0x12, 0x34, 0x01]
        );
        assert_eq!(
            MacAddr::try_from([0x52, 0x54, 0, 0x12, 0x34, 0x01]).unwrap(),
            mac("52:54:00:12:34:01")
        );
    }

    #[test]
    fn mac_rejections() {
        let shape = "expected six two-digit hex octets separated by ':' or '-'";
        for (input, reason) in [
            ("", shape),
            ("52:54:00:12:34", shape),
            ("52:54:00:12:34:01:02", shape),
            ("52:54:00-12:34:01", shape),
            ("52.54.00.12.34.01", shape),
            ("525400123401", shape),
            ("52:54:00:12:34:g1", shape),
            ("52:54:00:12:34:+1", shape),
            ("5:254:00:12:34:01", shape),
            ("52:54:00:12:34:é", shape),
            ("01:00:5e:00:00:01", "is a multicast address"),
            ("ff:ff:ff:ff:ff:ff", "is a multicast address"),
            ("00:00:00:00:00:00", "must not be all zeros"),
        ] {
            let e = input.parse::<MacAddr>().unwrap_err();
            assert_eq!(
                e,
                InvalidMac {
                    value: input.to_owned(),
                    reason
                },
                "{input:?}"
            );
        }
        let e = MacAddr::try_from([0x33, 0x33, 0, 0, 0, 1]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid MAC address \"33:33:00:00:00:01\": is a multicast address"
        );
    }

    // ----------------------------------------------------------- secrets ----

    #[test]
    fn bmc_debug_never_shows_a_password() {
        let inv = Inventory::load(Path::new(SHIPPED)).unwrap();
        let debug = format!("{inv:?}");
        assert!(debug.contains("LAB_BMC_PASSWORD_X86_01"));
        assert_eq!(format!("{:?}", Secret::new("hunter2")), "Secret(***)");
    }
}
