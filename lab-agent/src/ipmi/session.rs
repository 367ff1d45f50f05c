//! The RMCP+ session handshake, sans-IO: Open Session and RAKP 1–4 as a
//! [`Handshake`] that produces each request and checks each answer, ending
//! in the session keys and the Set Session Privilege Level command that
//! completes it; and the choice of cipher suites from the records the BMC
//! lists ([`usable_suites`]). [`super::client`] sends the requests outside
//! the session, feeds back the answers, activates the keys and sends the
//! privilege command inside the session.
//!
//! RAKP 1 asks for role = privilege | 0x10 (name-only lookup); the BMC's
//! RAKP 2 code must verify with the password (else [`IpmiError::BadRakp2`],
//! "wrong user or password"), and RAKP 4's integrity check value with the
//! session integrity key (else [`IpmiError::BadRakp4`]). Kg = the password:
//! a BMC key (non-null Kg) is not supported.

use std::net::SocketAddr;

use lab_types::Secret;

use super::commands::{self, SetSessionPrivilege};
use super::crypto::{self, CipherSuite, RakpParams, SessionKeys};
use super::error::IpmiError;
use super::packet::{
    OpenSessionRequest, OpenSessionResponse, PayloadType, Privilege, Rakp1, Rakp2, Rakp3, Rakp4,
};

/// One handshake request: a payload sent outside the session, answered by
/// a payload of type `expect` that echoes the first byte (the message tag).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The step, for errors and logs.
    pub what: &'static str,
    pub payload_type: PayloadType,
    pub payload: Vec<u8>,
    pub expect: PayloadType,
}

/// The random values of one handshake, drawn by the caller.
#[derive(Debug, Clone, Copy)]
pub struct Randoms {
    /// Our session id (SIDm); must not be 0.
    pub console_session_id: u32,
    /// The Open Session message tag (RAKP 1 and 3 use the next two).
    pub tag: u8,
    /// Our random number Rm.
    pub console_random: [u8; 16],
}

/// A session the BMC has authenticated, and that authenticated the BMC.
#[derive(Debug)]
pub struct Established {
    pub keys: SessionKeys,
    pub console_session_id: u32,
    pub bmc_session_id: u32,
    /// The last step, sent inside the session: the privilege asked for in
    /// Open Session and RAKP 1.
    pub set_privilege: SetSessionPrivilege,
}

/// What the BMC has told us so far.
#[derive(Debug, Clone, Copy, Default)]
struct Bmc {
    session_id: u32,
    random: [u8; 16],
    guid: [u8; 16],
}

/// One handshake with one cipher suite. Call [`Handshake::open_session`],
/// then [`Handshake::rakp1`] with its answer, [`Handshake::rakp3`] with
/// RAKP 2 and [`Handshake::finish`] with RAKP 4.
pub struct Handshake<'a> {
    endpoint: SocketAddr,
    suite: CipherSuite,
    privilege: Privilege,
    user: &'a [u8],
    password: &'a Secret,
    randoms: Randoms,
    bmc: Bmc,
}

impl std::fmt::Debug for Handshake<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handshake")
            .field("endpoint", &self.endpoint)
            .field("suite", &self.suite)
            .finish_non_exhaustive()
    }
}

impl<'a> Handshake<'a> {
    pub fn new(
        endpoint: SocketAddr,
        suite: CipherSuite,
        privilege: Privilege,
        user: &'a str,
        password: &'a Secret,
        randoms: Randoms,
    ) -> Self {
        Handshake {
            endpoint,
            suite,
            privilege,
            user: user.as_bytes(),
            password,
            randoms,
            bmc: Bmc::default(),
        }
    }

    /// The role byte of RAKP 1: the privilege, name-only lookup.
    fn role(&self) -> u8 {
        0x10 | self.privilege as u8
    }

    fn params(&self) -> RakpParams<'a> {
        RakpParams {
            console_session_id: self.randoms.console_session_id,
            bmc_session_id: self.bmc.session_id,
            console_random: self.randoms.console_random,
            bmc_random: self.bmc.random,
            bmc_guid: self.bmc.guid,
            role: self.role(),
            user: self.user,
        }
    }

    fn rejected(&self, step: &'static str, status: u8) -> IpmiError {
        IpmiError::Rejected {
            endpoint: self.endpoint,
            step,
            status,
        }
    }

    /// Open Session: our session id, the privilege and the suite's three
    /// algorithms.
    pub fn open_session(&self) -> Request {
        let suite = self.suite;
        Request {
            what: "Open Session",
            payload_type: PayloadType::OpenSessionRequest,
            payload: OpenSessionRequest {
                tag: self.randoms.tag,
                max_privilege: self.privilege as u8,
                console_session_id: self.randoms.console_session_id,
                auth_alg: suite.auth_alg(),
                integrity_alg: suite.integrity_alg(),
                confidentiality_alg: suite.confidentiality_alg(),
            }
            .encode(),
            expect: PayloadType::OpenSessionResponse,
        }
    }

    /// Checks the Open Session response; RAKP 1.
    pub fn rakp1(&mut self, open_session_response: &[u8]) -> Result<Request, IpmiError> {
        let resp = OpenSessionResponse::decode(open_session_response).map_err(|source| {
            IpmiError::Encode {
                what: "Open Session",
                source,
            }
        })?;
        if resp.status != 0 {
            return Err(self.rejected("Open Session", resp.status));
        }
        self.bmc.session_id = resp.bmc_session_id;
        Ok(Request {
            what: "RAKP 1",
            payload_type: PayloadType::Rakp1,
            payload: Rakp1 {
                tag: self.randoms.tag.wrapping_add(1),
                bmc_session_id: self.bmc.session_id,
                console_random: self.randoms.console_random,
                role: self.role(),
                user: self.user.to_vec(),
            }
            .encode(),
            expect: PayloadType::Rakp2,
        })
    }

    /// Checks RAKP 2 (the BMC knows the password); RAKP 3 (so do we).
    pub fn rakp3(&mut self, rakp2: &[u8]) -> Result<Request, IpmiError> {
        let r2 = Rakp2::decode(rakp2).map_err(|source| IpmiError::Encode {
            what: "RAKP 2",
            source,
        })?;
        if r2.status != 0 {
            return Err(self.rejected("RAKP 1", r2.status));
        }
        self.bmc.random = r2.bmc_random;
        self.bmc.guid = r2.bmc_guid;
        let h = self.suite.hash();
        let params = self.params();
        if crypto::rakp2_auth_code(h, self.password.expose(), &params) != r2.auth_code {
            return Err(IpmiError::BadRakp2 {
                endpoint: self.endpoint,
            });
        }
        Ok(Request {
            what: "RAKP 3",
            payload_type: PayloadType::Rakp3,
            payload: Rakp3 {
                tag: self.randoms.tag.wrapping_add(2),
                status: 0,
                bmc_session_id: self.bmc.session_id,
                auth_code: crypto::rakp3_auth_code(h, self.password.expose(), &params),
            }
            .encode(),
            expect: PayloadType::Rakp4,
        })
    }

    /// Checks RAKP 4 against the session integrity key; the session keys.
    pub fn finish(self, rakp4: &[u8]) -> Result<Established, IpmiError> {
        let r4 = Rakp4::decode(rakp4).map_err(|source| IpmiError::Encode {
            what: "RAKP 4",
            source,
        })?;
        if r4.status != 0 {
            return Err(self.rejected("RAKP 3", r4.status));
        }
        let h = self.suite.hash();
        let params = self.params();
        let sik = crypto::session_integrity_key(h, self.password.expose(), &params);
        if crypto::rakp4_icv(h, &sik, &params) != r4.icv {
            return Err(IpmiError::BadRakp4 {
                endpoint: self.endpoint,
            });
        }
        Ok(Established {
            keys: SessionKeys::derive(self.suite, sik),
            console_session_id: self.randoms.console_session_id,
            bmc_session_id: self.bmc.session_id,
            set_privilege: SetSessionPrivilege(self.privilege),
        })
    }
}

/// The configured suites the BMC lists (in the configured order), from the
/// records of Get Channel Cipher Suites; the configured list when it lists
/// none of them.
pub fn usable_suites(configured: &[CipherSuite], records: &[u8]) -> Vec<CipherSuite> {
    let offered = commands::parse_cipher_suite_records(records);
    let usable: Vec<_> = configured
        .iter()
        .copied()
        .filter(|s| offered.contains(&s.id()))
        .collect();
    if usable.is_empty() {
        configured.to_vec()
    } else {
        usable
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BMC_SID: u32 = 0x0200_0a0b;
    const BMC_RANDOM: [u8; 16] = [0x5a; 16];
    const BMC_GUID: [u8; 16] = [0xa5; 16];

    fn randoms() -> Randoms {
        Randoms {
            console_session_id: 0x1234_5679,
            tag: 0xfe,
            console_random: [7; 16],
        }
    }

    fn endpoint() -> SocketAddr {
        "127.0.0.1:623".parse().unwrap()
    }

    /// The BMC's side, computed from the spec with the BMC's password.
    fn open_session_response(tag: u8, status: u8) -> Vec<u8> {
        let mut v = vec![tag, status, 4, 0];
        v.extend_from_slice(&randoms().console_session_id.to_le_bytes());
        v.extend_from_slice(&BMC_SID.to_le_bytes());
        let s = CipherSuite::Suite3;
        for (i, alg) in [s.auth_alg(), s.integrity_alg(), s.confidentiality_alg()]
            .into_iter()
            .enumerate()
        {
            v.extend_from_slice(&[i as u8, 0, 0, 8, alg, 0, 0, 0]);
        }
        v
    }

    fn bmc_params(user: &[u8]) -> RakpParams<'_> {
        RakpParams {
            console_session_id: randoms().console_session_id,
            bmc_session_id: BMC_SID,
            console_random: randoms().console_random,
            bmc_random: BMC_RANDOM,
            bmc_guid: BMC_GUID,
            role: 0x10 | Privilege::Administrator as u8,
            user,
        }
    }

    fn rakp2(tag: u8, bmc_password: &[u8]) -> Vec<u8> {
        let mut v = vec![tag, 0, 0, 0];
        v.extend_from_slice(&randoms().console_session_id.to_le_bytes());
        v.extend_from_slice(&BMC_RANDOM);
        v.extend_from_slice(&BMC_GUID);
        v.extend(crypto::rakp2_auth_code(
            CipherSuite::Suite3.hash(),
            bmc_password,
            &bmc_params(b"admin"),
        ));
        v
    }

    fn rakp4(tag: u8, bmc_password: &[u8]) -> Vec<u8> {
        let h = CipherSuite::Suite3.hash();
        let p = bmc_params(b"admin");
        let sik = crypto::session_integrity_key(h, bmc_password, &p);
        let mut v = vec![tag, 0, 0, 0];
        v.extend_from_slice(&randoms().console_session_id.to_le_bytes());
        v.extend(crypto::rakp4_icv(h, &sik, &p));
        v
    }

    fn handshake(password: &Secret) -> Handshake<'_> {
        Handshake::new(
            endpoint(),
            CipherSuite::Suite3,
            Privilege::Administrator,
            "admin",
            password,
            randoms(),
        )
    }

    #[test]
    fn a_full_handshake_yields_the_bmcs_keys() {
        let password = Secret::new(b"hunter2".to_vec());
        let mut hs = handshake(&password);
        let open = hs.open_session();
        assert_eq!(
            (open.payload_type, open.expect, open.payload[0]),
            (
                PayloadType::OpenSessionRequest,
                PayloadType::OpenSessionResponse,
                0xfe
            )
        );
        let r1 = hs.rakp1(&open_session_response(0xfe, 0)).unwrap();
        assert_eq!((r1.payload_type, r1.payload[0]), (PayloadType::Rakp1, 0xff));
        // Role: Administrator (4) with name-only lookup.
        assert_eq!(r1.payload[24], 0x14);
        let r3 = hs.rakp3(&rakp2(0xff, b"hunter2")).unwrap();
        assert_eq!((r3.payload_type, r3.payload[0]), (PayloadType::Rakp3, 0x00));
        let want_code = crypto::rakp3_auth_code(
            CipherSuite::Suite3.hash(),
            b"hunter2",
            &bmc_params(b"admin"),
        );
        assert_eq!(&r3.payload[8..], &want_code[..]);
        let est = hs.finish(&rakp4(0x00, b"hunter2")).unwrap();
        assert_eq!(
            (est.console_session_id, est.bmc_session_id),
            (0x1234_5679, BMC_SID)
        );
        assert_eq!(est.set_privilege.0, Privilege::Administrator);
        let sik = crypto::session_integrity_key(
            CipherSuite::Suite3.hash(),
            b"hunter2",
            &bmc_params(b"admin"),
        );
        let bmc_keys = SessionKeys::derive(CipherSuite::Suite3, sik);
        assert_eq!(est.keys.suite, CipherSuite::Suite3);
        assert_eq!(est.keys.sik[..], bmc_keys.sik[..]);
        assert_eq!(est.keys.k1[..], bmc_keys.k1[..]);
        assert_eq!(est.keys.k2[..], bmc_keys.k2[..]);
    }

    #[test]
    fn every_refusal_names_its_step() {
        let password = Secret::new(b"hunter2".to_vec());
        let mut hs = handshake(&password);
        let e = hs.rakp1(&open_session_response(0xfe, 0x11)).unwrap_err();
        assert!(
            matches!(
                e,
                IpmiError::Rejected {
                    step: "Open Session",
                    status: 0x11,
                    ..
                }
            ),
            "{e:?}"
        );
        let mut hs = handshake(&password);
        hs.rakp1(&open_session_response(0xfe, 0)).unwrap();
        let e = hs.rakp3(&[0xff, 0x0d]).unwrap_err();
        assert!(
            matches!(
                e,
                IpmiError::Rejected {
                    step: "RAKP 1",
                    status: 0x0d,
                    ..
                }
            ),
            "{e:?}"
        );
        // The BMC has another password: its RAKP 2 does not verify.
        let mut hs = handshake(&password);
        hs.rakp1(&open_session_response(0xfe, 0)).unwrap();
        let e = hs.rakp3(&rakp2(0xff, b"other")).unwrap_err();
        assert!(matches!(e, IpmiError::BadRakp2 { .. }), "{e:?}");
        // A RAKP 4 that does not verify.
        let mut hs = handshake(&password);
        hs.rakp1(&open_session_response(0xfe, 0)).unwrap();
        hs.rakp3(&rakp2(0xff, b"hunter2")).unwrap();
        let e = hs.finish(&rakp4(0x00, b"other")).unwrap_err();
        assert!(matches!(e, IpmiError::BadRakp4 { .. }), "{e:?}");
        // Short answers are errors, not panics.
        let mut hs = handshake(&password);
        assert!(matches!(
            hs.rakp1(&[0xfe]).unwrap_err(),
            IpmiError::Encode {
                what: "Open Session",
                ..
            }
        ));
    }

    #[test]
    fn suites_follow_the_configured_order_and_fall_back() {
        let configured = [CipherSuite::Suite17, CipherSuite::Suite3];
        // Records: start-of-record 0xC0, suite id, algorithms.
        let only3 = [0xC0, 3, 0x01, 0x41, 0x81];
        assert_eq!(usable_suites(&configured, &only3), [CipherSuite::Suite3]);
        let both = [0xC0, 3, 0x01, 0x41, 0x81, 0xC0, 17, 0x03, 0x44, 0x81];
        assert_eq!(usable_suites(&configured, &both), configured);
        let neither = [0xC0, 1, 0x01, 0x00, 0x00];
        assert_eq!(usable_suites(&configured, &neither), configured);
    }
}
