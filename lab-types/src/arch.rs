//! A host's CPU architecture and boot firmware: what decides its boot file
//! (iPXE for BIOS and x86_64 UEFI, GRUB for aarch64 UEFI).

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// CPU architecture of a host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Arch {
    X86_64,
    Aarch64,
}

impl FromStr for Arch {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "x86_64" => Ok(Arch::X86_64),
            "aarch64" => Ok(Arch::Aarch64),
            other => Err(format!(
                "unknown arch {other:?} (expected x86_64 or aarch64)"
            )),
        }
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Arch::X86_64 => "x86_64",
            Arch::Aarch64 => "aarch64",
        })
    }
}

/// Firmware a host boots with; it decides the PXE boot file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Firmware {
    Bios,
    Uefi,
}

impl FromStr for Firmware {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "bios" => Ok(Firmware::Bios),
            "uefi" => Ok(Firmware::Uefi),
            other => Err(format!(
                "unknown firmware {other:?} (expected bios or uefi)"
            )),
        }
    }
}

impl fmt::Display for Firmware {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Firmware::Bios => "bios",
            Firmware::Uefi => "uefi",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        for a in [Arch::X86_64, Arch::Aarch64] {
            assert_eq!(a.to_string().parse::<Arch>().unwrap(), a);
        }
        for f in [Firmware::Bios, Firmware::Uefi] {
            assert_eq!(f.to_string().parse::<Firmware>().unwrap(), f);
        }
        assert!("arm".parse::<Arch>().is_err());
        assert!("efi".parse::<Firmware>().is_err());
    }
}
