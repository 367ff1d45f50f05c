//! RMCP+ cryptography as pure functions: the RAKP authentication codes, the
//! session integrity key (SIK) and K1/K2, HMAC integrity, and AES-CBC-128
//! with IPMI's confidentiality padding. Every key is held in a
//! [`Zeroizing`] buffer so it is wiped when dropped.

use aes::Aes128;
use cbc::cipher::block_padding::NoPadding;
use cbc::cipher::{BlockDecryptMut, BlockEncryptMut, KeyIvInit};
use hmac::{Hmac, Mac};
use zeroize::Zeroizing;

/// A secret byte string (password, key) that is zeroized on drop.
pub type SecretBytes = Zeroizing<Vec<u8>>;

/// Errors of the pure crypto functions.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CryptoError {
    /// The ciphertext is not a whole number of AES blocks after the IV.
    #[error("encrypted payload of {len} bytes is not an IV plus whole AES blocks")]
    BadCiphertextLength { len: usize },
    /// The confidentiality trailer (pad bytes 1, 2, 3, … and pad length) is wrong.
    #[error("bad confidentiality padding")]
    BadPadding,
    /// The key is shorter than the algorithm needs.
    #[error("key of {len} bytes is too short")]
    ShortKey { len: usize },
}

/// The hash behind an RAKP authentication or integrity algorithm.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HashAlg {
    /// HMAC-SHA1 (suite 3): 20-byte codes, integrity truncated to 12 bytes.
    Sha1,
    /// HMAC-SHA256 (suite 17): 32-byte codes, integrity truncated to 16 bytes.
    Sha256,
}

impl HashAlg {
    /// Full HMAC output length.
    pub fn output_len(self) -> usize {
        match self {
            HashAlg::Sha1 => 20,
            HashAlg::Sha256 => 32,
        }
    }

    /// Length of the truncated codes: the RAKP4 integrity check value and the
    /// per-packet AuthCode (HMAC-SHA1-96 / HMAC-SHA256-128).
    pub fn truncated_len(self) -> usize {
        match self {
            HashAlg::Sha1 => 12,
            HashAlg::Sha256 => 16,
        }
    }

    /// HMAC of the concatenation of `parts` under `key`.
    pub fn hmac(self, key: &[u8], parts: &[&[u8]]) -> Vec<u8> {
        match self {
            HashAlg::Sha1 => {
                let mut m = <Hmac<sha1::Sha1> as Mac>::new_from_slice(key)
                    .expect("HMAC accepts keys of any length");
                for p in parts {
                    m.update(p);
                }
                m.finalize().into_bytes().to_vec()
            }
            HashAlg::Sha256 => {
                let mut m = <Hmac<sha2::Sha256> as Mac>::new_from_slice(key)
                    .expect("HMAC accepts keys of any length");
                for p in parts {
                    m.update(p);
                }
                m.finalize().into_bytes().to_vec()
            }
        }
    }
}

/// A cipher suite this client speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CipherSuite {
    /// Suite 3: RAKP-HMAC-SHA1, HMAC-SHA1-96, AES-CBC-128.
    Suite3,
    /// Suite 17: RAKP-HMAC-SHA256, HMAC-SHA256-128, AES-CBC-128.
    Suite17,
}

impl CipherSuite {
    /// The suite's number as in Get Channel Cipher Suites and `ipmitool -C`.
    pub fn id(self) -> u8 {
        match self {
            CipherSuite::Suite3 => 3,
            CipherSuite::Suite17 => 17,
        }
    }

    /// The suite with this number, if supported.
    pub fn from_id(id: u8) -> Option<Self> {
        match id {
            3 => Some(CipherSuite::Suite3),
            17 => Some(CipherSuite::Suite17),
            _ => None,
        }
    }

    /// The hash used by both RAKP authentication and integrity.
    pub fn hash(self) -> HashAlg {
        match self {
            CipherSuite::Suite3 => HashAlg::Sha1,
            CipherSuite::Suite17 => HashAlg::Sha256,
        }
    }

    /// Authentication algorithm number in the Open Session Request.
    pub fn auth_alg(self) -> u8 {
        match self {
            CipherSuite::Suite3 => 0x01,
            CipherSuite::Suite17 => 0x03,
        }
    }

    /// Integrity algorithm number in the Open Session Request.
    pub fn integrity_alg(self) -> u8 {
        match self {
            CipherSuite::Suite3 => 0x01,
            CipherSuite::Suite17 => 0x04,
        }
    }

    /// Confidentiality algorithm number (AES-CBC-128 for both).
    pub fn confidentiality_alg(self) -> u8 {
        0x01
    }
}

/// The values both sides hash during RAKP, in wire byte order.
#[derive(Clone, Debug)]
pub struct RakpParams<'a> {
    /// Remote console (our) session id, SIDm.
    pub console_session_id: u32,
    /// Managed system (BMC) session id, SIDc.
    pub bmc_session_id: u32,
    /// Remote console random number, Rm.
    pub console_random: [u8; 16],
    /// Managed system random number, Rc.
    pub bmc_random: [u8; 16],
    /// Managed system GUID, GUIDc.
    pub bmc_guid: [u8; 16],
    /// Requested role byte exactly as sent in RAKP 1 (privilege | lookup bits).
    pub role: u8,
    /// User name (at most 16 bytes).
    pub user: &'a [u8],
}

/// RAKP 2 key exchange authentication code, keyed with the password (Kuid):
/// HMAC(SIDm, SIDc, Rm, Rc, GUIDc, ROLEm, ULENGTHm, UNAMEm).
pub fn rakp2_auth_code(h: HashAlg, password: &[u8], p: &RakpParams<'_>) -> Vec<u8> {
    h.hmac(
        password,
        &[
            &p.console_session_id.to_le_bytes(),
            &p.bmc_session_id.to_le_bytes(),
            &p.console_random,
            &p.bmc_random,
            &p.bmc_guid,
            &[p.role, p.user.len() as u8],
            p.user,
        ],
    )
}

/// RAKP 3 authentication code, keyed with Kuid: HMAC(Rc, SIDm, ROLEm, ULENGTHm, UNAMEm).
pub fn rakp3_auth_code(h: HashAlg, password: &[u8], p: &RakpParams<'_>) -> Vec<u8> {
    h.hmac(
        password,
        &[
            &p.bmc_random,
            &p.console_session_id.to_le_bytes(),
            &[p.role, p.user.len() as u8],
            p.user,
        ],
    )
}

/// Session integrity key, keyed with Kg (= Kuid when the BMC has no BMC key):
/// HMAC(Rm, Rc, ROLEm, ULENGTHm, UNAMEm).
pub fn session_integrity_key(h: HashAlg, kg: &[u8], p: &RakpParams<'_>) -> SecretBytes {
    Zeroizing::new(h.hmac(
        kg,
        &[
            &p.console_random,
            &p.bmc_random,
            &[p.role, p.user.len() as u8],
            p.user,
        ],
    ))
}

/// RAKP 4 integrity check value: HMAC_SIK(Rm, SIDc, GUIDc), truncated.
pub fn rakp4_icv(h: HashAlg, sik: &[u8], p: &RakpParams<'_>) -> Vec<u8> {
    let mut v = h.hmac(
        sik,
        &[
            &p.console_random,
            &p.bmc_session_id.to_le_bytes(),
            &p.bmc_guid,
        ],
    );
    v.truncate(h.truncated_len());
    v
}

/// The keys of an established session.
pub struct SessionKeys {
    /// The negotiated suite.
    pub suite: CipherSuite,
    /// Session integrity key.
    pub sik: SecretBytes,
    /// K1 = HMAC_SIK(0x01 repeated): the integrity key.
    pub k1: SecretBytes,
    /// K2 = HMAC_SIK(0x02 repeated): its first 16 bytes are the AES key.
    pub k2: SecretBytes,
}

impl std::fmt::Debug for SessionKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionKeys")
            .field("suite", &self.suite)
            .finish_non_exhaustive()
    }
}

impl SessionKeys {
    /// Derive K1 and K2 from the SIK.
    pub fn derive(suite: CipherSuite, sik: SecretBytes) -> Self {
        let h = suite.hash();
        let k1 = Zeroizing::new(h.hmac(&sik, &[&vec![0x01; h.output_len()]]));
        let k2 = Zeroizing::new(h.hmac(&sik, &[&vec![0x02; h.output_len()]]));
        SessionKeys { suite, sik, k1, k2 }
    }

    /// The per-packet AuthCode over `data` (auth type through next header).
    pub fn integrity(&self, data: &[u8]) -> Vec<u8> {
        let h = self.suite.hash();
        let mut v = h.hmac(&self.k1, &[data]);
        v.truncate(h.truncated_len());
        v
    }

    /// The AES-128 key: the first 16 bytes of K2.
    pub fn aes_key(&self) -> &[u8] {
        &self.k2[..16]
    }
}

/// AES-CBC-128 encryption with IPMI's trailer: pad bytes 0x01, 0x02, … then
/// the pad length, so the whole is a multiple of 16. Returns IV ‖ ciphertext.
pub fn aes_cbc_encrypt(key: &[u8], iv: [u8; 16], plain: &[u8]) -> Result<Vec<u8>, CryptoError> {
    if key.len() < 16 {
        return Err(CryptoError::ShortKey { len: key.len() });
    }
    let pad = (16 - (plain.len() + 1) % 16) % 16;
    let mut buf = Zeroizing::new(Vec::with_capacity(plain.len() + pad + 1));
    buf.extend_from_slice(plain);
    buf.extend((1..=pad as u8).collect::<Vec<u8>>());
    buf.push(pad as u8);
    let len = buf.len();
    let enc = cbc::Encryptor::<Aes128>::new_from_slices(&key[..16], &iv)
        .map_err(|_| CryptoError::ShortKey { len: key.len() })?;
    enc.encrypt_padded_mut::<NoPadding>(&mut buf, len)
        .map_err(|_| CryptoError::BadCiphertextLength { len })?;
    let mut out = iv.to_vec();
    out.extend_from_slice(&buf);
    Ok(out)
}

/// Inverse of [`aes_cbc_encrypt`]: takes IV ‖ ciphertext, checks and strips
/// the trailer.
pub fn aes_cbc_decrypt(key: &[u8], data: &[u8]) -> Result<Vec<u8>, CryptoError> {
    if key.len() < 16 {
        return Err(CryptoError::ShortKey { len: key.len() });
    }
    if data.len() < 32 || !data.len().is_multiple_of(16) {
        return Err(CryptoError::BadCiphertextLength { len: data.len() });
    }
    let (iv, ct) = data.split_at(16);
    let mut buf = ct.to_vec();
    let dec = cbc::Decryptor::<Aes128>::new_from_slices(&key[..16], iv)
        .map_err(|_| CryptoError::ShortKey { len: key.len() })?;
    dec.decrypt_padded_mut::<NoPadding>(&mut buf)
        .map_err(|_| CryptoError::BadCiphertextLength { len: data.len() })?;
    let pad = *buf.last().ok_or(CryptoError::BadPadding)? as usize;
    if pad > 15 || pad + 1 > buf.len() {
        return Err(CryptoError::BadPadding);
    }
    let body_len = buf.len() - pad - 1;
    if buf[body_len..body_len + pad]
        .iter()
        .enumerate()
        .any(|(i, &b)| b as usize != i + 1)
    {
        return Err(CryptoError::BadPadding);
    }
    buf.truncate(body_len);
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aes_round_trip_all_lengths() {
        let key = [7u8; 16];
        for n in 0..40 {
            let plain: Vec<u8> = (0..n as u8).collect();
            let ct = aes_cbc_encrypt(&key, [9; 16], &plain).unwrap();
            assert_eq!(ct.len() % 16, 0);
            assert_eq!(aes_cbc_decrypt(&key, &ct).unwrap(), plain);
        }
    }
}
