//! The validated DHCP configuration of one rack: mode, addressing, boot
//! file names and the per-host script URL template.

use std::net::Ipv4Addr;
use std::time::Duration;

/// How the agent takes part in DHCP on its rack's link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The only DHCP server on the link: answers inventory MACs with their
    /// static address (or one from `pool`) plus boot information.
    Authoritative,
    /// ProxyDHCP beside an existing DHCP server: boot information only, no
    /// address; also answers boot-server REQUESTs on port 4011.
    Proxy,
}

/// Boot file names (relative to the TFTP root) and the HTTP-boot URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootFiles {
    /// Legacy BIOS PXE (option 93 = 0): an iPXE PXE binary.
    pub bios: String,
    /// x86-64 UEFI (option 93 = 7 or 9).
    pub efi_x64: String,
    /// arm64 UEFI (option 93 = 11).
    pub efi_arm64: String,
    /// UEFI HTTP boot, x86-64 (option 93 = 16): a full URL.
    pub http_efi_x64: String,
    /// UEFI HTTP boot, arm64 (option 93 = 19): a full URL.
    pub http_efi_arm64: String,
}

/// Everything [`decide`](super::decide::decide) and the server need.
///
/// Build it with [`DhcpConfig::new`] and adjust the public fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DhcpConfig {
    pub mode: Mode,
    /// Interface the sockets bind to (`SO_BINDTODEVICE`); `None` = all.
    pub interface: Option<String>,
    /// Our address on the rack link: server identifier (option 54).
    pub server_ip: Ipv4Addr,
    /// TFTP server for the boot file (`siaddr`); usually `server_ip`.
    pub next_server: Ipv4Addr,
    pub subnet_mask: Ipv4Addr,
    pub router: Option<Ipv4Addr>,
    pub dns: Vec<Ipv4Addr>,
    /// Lease time in seconds (option 51), authoritative mode only.
    pub lease_secs: u32,
    /// Addresses for inventory hosts without a static one. Hosts get them
    /// in MAC order, so the choice is stable and needs no lease state.
    pub pool: Vec<Ipv4Addr>,
    pub boot_files: BootFiles,
    /// URL given to a client that already runs iPXE (option 77 `iPXE`).
    /// Placeholders: `{mac}` (`aa-bb-cc-dd-ee-ff`), `{server_ip}`,
    /// `{next_server}`.
    pub script_url_template: String,
    /// Send iPXE's encapsulated option 175.176 = 1 (no-pxedhcp) so iPXE
    /// does not wait ~3 s for a ProxyDHCP reply. Authoritative mode only.
    pub ipxe_no_pxedhcp: bool,
    /// One log line per this interval for a flood of malformed datagrams.
    pub log_interval: Duration,
}

impl DhcpConfig {
    /// Defaults: 24-bit mask, no router, one-hour leases, iPXE boot files
    /// (`undionly.kpxe`, `ipxe.efi`, `ipxe-arm64.efi`) and a TFTP per-host
    /// script URL `tftp://{next_server}/hosts/{mac}.ipxe`.
    pub fn new(mode: Mode, server_ip: Ipv4Addr) -> Self {
        Self {
            mode,
            interface: None,
            server_ip,
            next_server: server_ip,
            subnet_mask: Ipv4Addr::new(255, 255, 255, 0),
            router: None,
            dns: Vec::new(),
            lease_secs: 3600,
            pool: Vec::new(),
            boot_files: BootFiles {
                bios: "undionly.kpxe".to_owned(),
                efi_x64: "ipxe.efi".to_owned(),
                efi_arm64: "ipxe-arm64.efi".to_owned(),
                http_efi_x64: format!("http://{server_ip}/ipxe.efi"),
                http_efi_arm64: format!("http://{server_ip}/ipxe-arm64.efi"),
            },
            script_url_template: "tftp://{next_server}/hosts/{mac}.ipxe".to_owned(),
            ipxe_no_pxedhcp: true,
            log_interval: crate::ratelimit::DEFAULT_LOG_INTERVAL,
        }
    }

    /// The per-host iPXE script URL for `mac`.
    pub fn script_url(&self, mac: &crate::hosts::MacAddr) -> String {
        self.script_url_template
            .replace("{mac}", &mac.hyphenated())
            .replace("{server_ip}", &self.server_ip.to_string())
            .replace("{next_server}", &self.next_server.to_string())
    }
}
