//! IPMI commands, sans-IO: each command encodes its request data and parses
//! its response data (after the completion code) as pure functions.

use super::packet::Privilege;

/// Errors parsing a command's response data.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CommandError {
    /// Response data shorter than the command defines.
    #[error("{command} response: need {need} bytes, have {have}")]
    Truncated {
        command: &'static str,
        need: usize,
        have: usize,
    },
    /// A value the command does not define.
    #[error("{command} response: unexpected {field} {value:#04x}")]
    Unexpected {
        command: &'static str,
        field: &'static str,
        value: u8,
    },
}

/// A command: its address and the pure request/response halves.
pub trait Command {
    /// Parsed response.
    type Output;
    /// Name for errors and logs.
    const NAME: &'static str;
    /// Network function of the request.
    const NETFN: u8;
    /// Command number.
    const CMD: u8;
    /// Request data.
    fn request_data(&self) -> Vec<u8>;
    /// Parse response data (completion code already checked to be 0).
    fn parse_response(&self, data: &[u8]) -> Result<Self::Output, CommandError>;
}

fn need(command: &'static str, d: &[u8], n: usize) -> Result<(), CommandError> {
    if d.len() < n {
        Err(CommandError::Truncated {
            command,
            need: n,
            have: d.len(),
        })
    } else {
        Ok(())
    }
}

/// Network functions.
pub mod netfn {
    /// Chassis.
    pub const CHASSIS: u8 = 0x00;
    /// Application.
    pub const APP: u8 = 0x06;
}

/// Completion code: node busy (retry later).
pub const CC_NODE_BUSY: u8 = 0xC0;
/// Completion code: insufficient privilege.
pub const CC_INSUFFICIENT_PRIVILEGE: u8 = 0xD4;

/// Get Channel Cipher Suites (App 0x54), one 16-byte block of the list.
#[derive(Clone, Copy, Debug)]
pub struct GetChannelCipherSuites {
    /// List index 0..=63.
    pub index: u8,
}

impl Command for GetChannelCipherSuites {
    type Output = Vec<u8>;
    const NAME: &'static str = "Get Channel Cipher Suites";
    const NETFN: u8 = netfn::APP;
    const CMD: u8 = 0x54;
    fn request_data(&self) -> Vec<u8> {
        // Current channel, IPMI payload, list by cipher suite.
        vec![0x0E, 0x00, 0x80 | (self.index & 0x3F)]
    }
    /// The raw record bytes of this block (after the channel number).
    fn parse_response(&self, data: &[u8]) -> Result<Vec<u8>, CommandError> {
        need(Self::NAME, data, 1)?;
        Ok(data[1..].to_vec())
    }
}

/// The cipher suite ids in a concatenated Get Channel Cipher Suites list.
pub fn parse_cipher_suite_records(list: &[u8]) -> Vec<u8> {
    let mut ids = Vec::new();
    let mut i = 0;
    while i < list.len() {
        match list[i] {
            0xC0 if i + 1 < list.len() => {
                ids.push(list[i + 1]);
                i += 2;
            }
            0xC1 if i + 4 < list.len() => {
                ids.push(list[i + 1]);
                i += 5;
            }
            _ => i += 1, // algorithm bytes
        }
    }
    ids
}

/// Set Session Privilege Level (App 0x3B).
#[derive(Clone, Copy, Debug)]
pub struct SetSessionPrivilege(pub Privilege);

impl Command for SetSessionPrivilege {
    type Output = u8;
    const NAME: &'static str = "Set Session Privilege Level";
    const NETFN: u8 = netfn::APP;
    const CMD: u8 = 0x3B;
    fn request_data(&self) -> Vec<u8> {
        vec![self.0 as u8]
    }
    fn parse_response(&self, data: &[u8]) -> Result<u8, CommandError> {
        need(Self::NAME, data, 1)?;
        Ok(data[0] & 0x0F)
    }
}

/// Close Session (App 0x3C).
#[derive(Clone, Copy, Debug)]
pub struct CloseSession {
    /// The BMC's session id.
    pub bmc_session_id: u32,
}

impl Command for CloseSession {
    type Output = ();
    const NAME: &'static str = "Close Session";
    const NETFN: u8 = netfn::APP;
    const CMD: u8 = 0x3C;
    fn request_data(&self) -> Vec<u8> {
        self.bmc_session_id.to_le_bytes().to_vec()
    }
    fn parse_response(&self, _data: &[u8]) -> Result<(), CommandError> {
        Ok(())
    }
}

/// Chassis power and fault state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChassisStatus {
    /// System power is on.
    pub power_on: bool,
    /// Power overload.
    pub overload: bool,
    /// Interlock active.
    pub interlock: bool,
    /// Main power fault.
    pub power_fault: bool,
    /// Power control fault.
    pub control_fault: bool,
    /// Power restore policy (0 off, 1 previous, 2 on, 3 unknown).
    pub restore_policy: u8,
    /// Last power event byte.
    pub last_event: u8,
    /// Misc chassis state byte.
    pub misc: u8,
}

/// Get Chassis Status (Chassis 0x01).
#[derive(Clone, Copy, Debug)]
pub struct GetChassisStatus;

impl Command for GetChassisStatus {
    type Output = ChassisStatus;
    const NAME: &'static str = "Get Chassis Status";
    const NETFN: u8 = netfn::CHASSIS;
    const CMD: u8 = 0x01;
    fn request_data(&self) -> Vec<u8> {
        Vec::new()
    }
    fn parse_response(&self, d: &[u8]) -> Result<ChassisStatus, CommandError> {
        need(Self::NAME, d, 3)?;
        Ok(ChassisStatus {
            power_on: d[0] & 0x01 != 0,
            overload: d[0] & 0x02 != 0,
            interlock: d[0] & 0x04 != 0,
            power_fault: d[0] & 0x08 != 0,
            control_fault: d[0] & 0x10 != 0,
            restore_policy: (d[0] >> 5) & 0x03,
            last_event: d[1],
            misc: d[2],
        })
    }
}

/// Chassis Control actions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PowerAction {
    /// Power down (hard off).
    Off,
    /// Power up.
    On,
    /// Power cycle.
    Cycle,
    /// Hard reset.
    HardReset,
    /// Soft shutdown via ACPI.
    SoftShutdown,
}

impl PowerAction {
    /// Chassis Control data byte.
    pub fn code(self) -> u8 {
        match self {
            PowerAction::Off => 0,
            PowerAction::On => 1,
            PowerAction::Cycle => 2,
            PowerAction::HardReset => 3,
            PowerAction::SoftShutdown => 5,
        }
    }
}

/// Chassis Control (Chassis 0x02).
#[derive(Clone, Copy, Debug)]
pub struct ChassisControl(pub PowerAction);

impl Command for ChassisControl {
    type Output = ();
    const NAME: &'static str = "Chassis Control";
    const NETFN: u8 = netfn::CHASSIS;
    const CMD: u8 = 0x02;
    fn request_data(&self) -> Vec<u8> {
        vec![self.0.code()]
    }
    fn parse_response(&self, _d: &[u8]) -> Result<(), CommandError> {
        Ok(())
    }
}

/// Boot device selector of boot option parameter 5.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootDevice {
    /// No override.
    None,
    /// Network (PXE).
    Pxe,
    /// Default hard disk.
    Disk,
    /// Hard disk, safe mode.
    DiskSafe,
    /// Diagnostic partition.
    Diag,
    /// CD/DVD.
    Cdrom,
    /// BIOS setup.
    BiosSetup,
    /// Another selector value.
    Other(u8),
}

impl BootDevice {
    /// The 4-bit selector.
    pub fn selector(self) -> u8 {
        match self {
            BootDevice::None => 0,
            BootDevice::Pxe => 1,
            BootDevice::Disk => 2,
            BootDevice::DiskSafe => 3,
            BootDevice::Diag => 4,
            BootDevice::Cdrom => 5,
            BootDevice::BiosSetup => 6,
            BootDevice::Other(v) => v & 0x0F,
        }
    }

    /// From the 4-bit selector.
    pub fn from_selector(v: u8) -> Self {
        match v & 0x0F {
            0 => BootDevice::None,
            1 => BootDevice::Pxe,
            2 => BootDevice::Disk,
            3 => BootDevice::DiskSafe,
            4 => BootDevice::Diag,
            5 => BootDevice::Cdrom,
            6 => BootDevice::BiosSetup,
            o => BootDevice::Other(o),
        }
    }
}

/// Boot flags (parameter 5).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BootFlags {
    /// The flags are valid (the override is armed).
    pub valid: bool,
    /// Applies to all future boots instead of the next one.
    pub persistent: bool,
    /// Boot with EFI instead of legacy BIOS.
    pub efi: bool,
    /// Device.
    pub device: BootDevice,
}

impl BootFlags {
    /// The five data bytes.
    pub fn encode(&self) -> [u8; 5] {
        let mut b0 = 0;
        if self.valid {
            b0 |= 0x80;
        }
        if self.persistent {
            b0 |= 0x40;
        }
        if self.efi {
            b0 |= 0x20;
        }
        [b0, self.device.selector() << 2, 0, 0, 0]
    }

    /// From the data bytes (at least two).
    pub fn decode(d: &[u8]) -> Result<Self, CommandError> {
        need("boot flags", d, 2)?;
        Ok(BootFlags {
            valid: d[0] & 0x80 != 0,
            persistent: d[0] & 0x40 != 0,
            efi: d[0] & 0x20 != 0,
            device: BootDevice::from_selector(d[1] >> 2),
        })
    }
}

/// Boot option parameter numbers.
pub mod boot_param {
    /// BMC boot flag valid bit clearing.
    pub const VALID_BIT_CLEARING: u8 = 3;
    /// Boot flags.
    pub const BOOT_FLAGS: u8 = 5;
}

/// Set System Boot Options (Chassis 0x08): one parameter.
#[derive(Clone, Debug)]
pub struct SetSystemBootOptions {
    /// Parameter selector.
    pub param: u8,
    /// Parameter data.
    pub data: Vec<u8>,
}

impl SetSystemBootOptions {
    /// Set the boot flags.
    pub fn boot_flags(flags: BootFlags) -> Self {
        SetSystemBootOptions {
            param: boot_param::BOOT_FLAGS,
            data: flags.encode().to_vec(),
        }
    }

    /// Parameter 3: keep the valid bit past the 60-second Chassis Control
    /// timeout (bit 4); the other automatic clearings stay enabled.
    pub fn keep_valid_past_timeout() -> Self {
        SetSystemBootOptions {
            param: boot_param::VALID_BIT_CLEARING,
            data: vec![0x10],
        }
    }
}

impl Command for SetSystemBootOptions {
    type Output = ();
    const NAME: &'static str = "Set System Boot Options";
    const NETFN: u8 = netfn::CHASSIS;
    const CMD: u8 = 0x08;
    fn request_data(&self) -> Vec<u8> {
        let mut v = vec![self.param & 0x7F];
        v.extend_from_slice(&self.data);
        v
    }
    fn parse_response(&self, _d: &[u8]) -> Result<(), CommandError> {
        Ok(())
    }
}

/// Get System Boot Options (Chassis 0x09): one parameter's data.
#[derive(Clone, Copy, Debug)]
pub struct GetSystemBootOptions {
    /// Parameter selector.
    pub param: u8,
}

impl Command for GetSystemBootOptions {
    type Output = Vec<u8>;
    const NAME: &'static str = "Get System Boot Options";
    const NETFN: u8 = netfn::CHASSIS;
    const CMD: u8 = 0x09;
    fn request_data(&self) -> Vec<u8> {
        vec![self.param & 0x7F, 0, 0]
    }
    fn parse_response(&self, d: &[u8]) -> Result<Vec<u8>, CommandError> {
        need(Self::NAME, d, 2)?;
        if d[1] & 0x7F != self.param & 0x7F {
            return Err(CommandError::Unexpected {
                command: Self::NAME,
                field: "parameter",
                value: d[1],
            });
        }
        Ok(d[2..].to_vec())
    }
}

// ------------------------------------------------------------ payloads (SOL)

/// The payload instance we activate (the host's first serial port).
pub const SOL_INSTANCE: u8 = 1;
/// Completion code of Activate Payload: the payload is already active (in
/// another session, or a stale one of ours).
pub const CC_PAYLOAD_ALREADY_ACTIVE: u8 = 0x80;
/// Completion code of Deactivate Payload: the payload is not active.
pub const CC_PAYLOAD_ALREADY_INACTIVE: u8 = 0x80;

/// What the BMC answered to Activate Payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SolActivation {
    /// Auxiliary data (test mode etc.).
    pub aux: [u8; 4],
    /// Largest payload the BMC accepts from us.
    pub inbound_size: u16,
    /// Largest payload the BMC sends.
    pub outbound_size: u16,
    /// UDP port for the payload (we stay on the session's port).
    pub port: u16,
    /// VLAN, 0xFFFF if none.
    pub vlan: u16,
}

impl SolActivation {
    /// Characters per packet we send: the inbound size less the 4-byte
    /// header, within 1..=255 (32 if the BMC gives a size too small to use).
    pub fn max_chunk(&self) -> usize {
        let n = usize::from(self.inbound_size);
        if n <= 4 { 32 } else { (n - 4).min(255) }
    }
}

/// Activate Payload (App 0x48) for SOL instance 1.
#[derive(Clone, Copy, Debug)]
pub struct ActivatePayload {
    /// Ask for encrypted SOL packets.
    pub encrypt: bool,
    /// Ask for authenticated SOL packets.
    pub authenticate: bool,
}

impl Command for ActivatePayload {
    type Output = SolActivation;
    const NAME: &'static str = "Activate Payload";
    const NETFN: u8 = netfn::APP;
    const CMD: u8 = 0x48;
    fn request_data(&self) -> Vec<u8> {
        let mut aux = 0x04; // serial alerts deferred while SOL is active
        if self.encrypt {
            aux |= 0x80;
        }
        if self.authenticate {
            aux |= 0x40;
        }
        // Payload type, instance, auxiliary data (CTS/DCD/DSR asserted).
        vec![0x01, SOL_INSTANCE, aux, 0, 0, 0]
    }
    fn parse_response(&self, d: &[u8]) -> Result<SolActivation, CommandError> {
        if d.len() < 12 {
            return Err(CommandError::Truncated {
                command: Self::NAME,
                need: 12,
                have: d.len(),
            });
        }
        let u16le = |i: usize| u16::from_le_bytes([d[i], d[i + 1]]);
        Ok(SolActivation {
            aux: [d[0], d[1], d[2], d[3]],
            inbound_size: u16le(4),
            outbound_size: u16le(6),
            port: u16le(8),
            vlan: u16le(10),
        })
    }
}

/// Deactivate Payload (App 0x49) for SOL instance 1, whichever session
/// holds it.
#[derive(Clone, Copy, Debug)]
pub struct DeactivatePayload;

impl Command for DeactivatePayload {
    type Output = ();
    const NAME: &'static str = "Deactivate Payload";
    const NETFN: u8 = netfn::APP;
    const CMD: u8 = 0x49;
    fn request_data(&self) -> Vec<u8> {
        vec![0x01, SOL_INSTANCE, 0, 0, 0, 0]
    }
    fn parse_response(&self, _d: &[u8]) -> Result<(), CommandError> {
        Ok(())
    }
}

/// Get Payload Instance Info (App 0x4B) for SOL instance 1: the session
/// keepalive, which also tells whether SOL is still ours. Returns the id of
/// the session holding the payload (0: not active).
#[derive(Clone, Copy, Debug)]
pub struct GetPayloadInstanceInfo;

impl Command for GetPayloadInstanceInfo {
    type Output = u32;
    const NAME: &'static str = "Get Payload Instance Info";
    const NETFN: u8 = netfn::APP;
    const CMD: u8 = 0x4B;
    fn request_data(&self) -> Vec<u8> {
        vec![0x01, SOL_INSTANCE]
    }
    fn parse_response(&self, d: &[u8]) -> Result<u32, CommandError> {
        if d.len() < 4 {
            return Err(CommandError::Truncated {
                command: Self::NAME,
                need: 4,
                have: d.len(),
            });
        }
        Ok(u32::from_le_bytes([d[0], d[1], d[2], d[3]]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn activate_and_deactivate_bytes() {
        let a = ActivatePayload {
            encrypt: true,
            authenticate: true,
        };
        assert_eq!(a.request_data(), [0x01, 0x01, 0xC4, 0, 0, 0]);
        // ipmi_sim's answer: aux 0, inbound 32, outbound 16384, port 623, no VLAN.
        let r = a
            .parse_response(&[0, 0, 0, 0, 32, 0, 0x00, 0x40, 0x6F, 0x02, 0xFF, 0xFF])
            .unwrap();
        assert_eq!(
            r,
            SolActivation {
                aux: [0; 4],
                inbound_size: 32,
                outbound_size: 16384,
                port: 623,
                vlan: 0xFFFF
            }
        );
        assert_eq!(r.max_chunk(), 28);
        assert!(a.parse_response(&[0; 11]).is_err());
        assert_eq!(DeactivatePayload.request_data(), [0x01, 0x01, 0, 0, 0, 0]);
        assert_eq!(ActivatePayload::CMD, 0x48);
        assert_eq!(DeactivatePayload::CMD, 0x49);
        // ipmi_sim's answer while session 0x182 holds SOL.
        let info = GetPayloadInstanceInfo;
        assert_eq!(info.request_data(), [0x01, 0x01]);
        assert_eq!(
            info.parse_response(&[0x82, 0x01, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]),
            Ok(0x182)
        );
    }
}
