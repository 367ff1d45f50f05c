//! The fuzz targets (`lab_agent::fuzzing`, `lab_server::fuzzing`, run by
//! libFuzzer from `fuzz/`) in the normal test suite:
//!
//! - every seed (`fuzz/seeds/TARGET/`) and every input that ever made a
//!   target fail (`fuzz/regressions/TARGET/`) passes through its target;
//! - the seeds are what this file writes, in each target's input format,
//!   from the captured packets in `lab-agent/tests/fixtures/` and the
//!   shipped configuration files (regenerate with `UPDATE_GOLDEN=1`);
//! - every target has its `fuzz/fuzz_targets/TARGET.rs`, and every one
//!   there is a target.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use lab_agent::fuzzing::{
    InputWriter, IpmiMode, SolStep, console_log_input, ipmi_input, sol_input, tftp_input,
};
use lab_agent::ipmi::crypto::{CipherSuite, SecretBytes, SessionKeys};
use lab_agent::ipmi::packet::{IpmiResponse, PayloadType, encode_packet};
use lab_agent::ipmi::sol::SolPacket;
use lab_proto::v1 as pb;
use prost::Message;

fn targets() -> impl Iterator<Item = &'static lab_agent::fuzzing::Target> {
    lab_agent::fuzzing::TARGETS
        .iter()
        .chain(lab_server::fuzzing::TARGETS)
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn fixture(rel: &str) -> Vec<u8> {
    let path = repo().join("lab-agent/tests/fixtures").join(rel);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A `.hex` fixture: hex digits, `#` lines are comments.
fn hex_fixture(rel: &str) -> Vec<u8> {
    let text = String::from_utf8(fixture(rel)).expect("hex fixture is text");
    let hex: String = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .flat_map(|l| l.chars().filter(|c| !c.is_whitespace()))
        .collect();
    hex::decode(hex).expect("hex fixture")
}

fn repo_file(rel: &str) -> Vec<u8> {
    let path = repo().join(rel);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

type Seeds = BTreeMap<&'static str, Vec<u8>>;

fn dhcp_seeds() -> Seeds {
    [
        "ipxe-bios-discover",
        "ipxe-bios-request",
        "aavmf-arm64-discover",
        "aavmf-arm64-request",
    ]
    .into_iter()
    .map(|n| (n, hex_fixture(&format!("dhcp/{n}.hex"))))
    .collect()
}

fn tftp_seeds() -> Seeds {
    let ack = |n: u16| [0, 4, (n >> 8) as u8, n as u8];
    let acks: Vec<[u8; 4]> = (0..8).map(ack).collect();
    let acks: Vec<&[u8]> = acks.iter().map(|a| &a[..]).collect();
    let rrq = |name: &str, opts: &[(&str, &str)]| {
        let mut v = vec![0, 1];
        for s in [name, "octet"]
            .into_iter()
            .chain(opts.iter().flat_map(|(k, v)| [*k, *v]))
        {
            v.extend_from_slice(s.as_bytes());
            v.push(0);
        }
        v
    };
    let mut s = Seeds::new();
    s.insert(
        "ipxe-rrq",
        tftp_input(70_000, &fixture("tftp/ipxe_rrq.bin"), &acks),
    );
    s.insert(
        "curl-rrq-default",
        tftp_input(1024, &fixture("tftp/curl_rrq_default.bin"), &acks),
    );
    s.insert(
        "curl-rrq-blksize1468",
        tftp_input(3000, &fixture("tftp/curl_rrq_blksize1468.bin"), &acks),
    );
    // Windows of 16 over more than 65536 blocks: the block number wraps.
    s.insert(
        "atftp-rrq-windowsize-wrap",
        tftp_input(
            100_000_000,
            &fixture("tftp/atftp_rrq_windowsize.bin"),
            &[&ack(0), &ack(16), b""],
        ),
    );
    s.insert(
        "atftp-wrq",
        tftp_input(0, &fixture("tftp/atftp_wrq.bin"), &[]),
    );
    s.insert(
        "tftpd-hpa-oack",
        tftp_input(0, &fixture("tftp/tftpd_hpa_oack.bin"), &[]),
    );
    s.insert(
        "tftpd-hpa-notfound",
        tftp_input(0, &fixture("tftp/tftpd_hpa_notfound.bin"), &[]),
    );
    s.insert(
        "host-script-timeouts",
        tftp_input(
            600,
            &rrq(
                "hosts/52-54-00-12-34-56.ipxe",
                &[("timeout", "5"), ("tsize", "0")],
            ),
            &[b"", &ack(0), b"", b"", &ack(1), &ack(2)],
        ),
    );
    s.insert("escape", tftp_input(10, &rrq("../secret", &[]), &[]));
    s.insert(
        "artifact-symlink-out",
        tftp_input(10, &rrq("artifacts/out", &[]), &[]),
    );
    s
}

fn http_seeds() -> Seeds {
    let get =
        |path: &str, extra: &str| format!("GET {path} HTTP/1.1\r\nHost: agent\r\n{extra}\r\n");
    let mut s = Seeds::new();
    let mut add = |name, text: String| {
        s.insert(name, text.into_bytes());
    };
    add("boot-ipxe", get("/boot.ipxe", ""));
    add(
        "host-script-range",
        get("/hosts/52-54-00-12-34-56.ipxe", "Range: bytes=0-9\r\n"),
    );
    add("host-grub", get("/hosts/52:54:00:aa:00:01.grub", ""));
    add(
        "host-preseed-http10",
        "GET /hosts/52-54-00-00-00-0a.preseed HTTP/1.0\r\n\r\n".into(),
    );
    add(
        "host-stale-profile",
        get("/hosts/52-54-00-00-00-0d.ipxe", ""),
    );
    add(
        "artifact-head-suffix",
        "HEAD /artifacts/xen HTTP/1.1\r\nHost: agent\r\nRange: bytes=-100\r\n\r\n".into(),
    );
    add("dotdot-encoded", get("/%2e%2e/secret", ""));
    add(
        "symlinks-out",
        get("/escape", "") + &get("/abs", "") + &get("/up/secret", ""),
    );
    add(
        "artifacts-out",
        get("/artifacts/out", "") + &get("/artifacts/%2e%2e/secret", ""),
    );
    add("loop", get("/loop", ""));
    add(
        "pipelined-ranges",
        get("/sub/file.txt", "Range: bytes=2-\r\n")
            + &get("/sub\\file.txt", "Range: bytes=3-1\r\n")
            + &get("/artifacts/xen", "Range: bytes=4000-\r\n"),
    );
    add(
        "post",
        "POST /boot.ipxe HTTP/1.1\r\nHost: agent\r\nContent-Length: 3\r\n\r\nabc".into(),
    );
    s
}

fn ipmi_seeds() -> Seeds {
    let mut s = Seeds::new();
    let keys = SessionKeys::derive(CipherSuite::Suite17, SecretBytes::new(vec![0xa5; 32]));
    let chassis = IpmiResponse {
        netfn: 1,
        cmd: 1,
        rq_seq: 3,
        completion: 0,
        data: vec![0x01, 0x00, 0x00],
    }
    .encode();
    let plain = encode_packet(PayloadType::Ipmi, 0x0200_0a0b, 5, &chassis, None, [0; 16]).unwrap();
    s.insert(
        "datagram-chassis-status",
        ipmi_input(IpmiMode::Datagram, &plain),
    );
    // From the known-answer file: a packet sealed with suite 3 and 17 keys.
    let kat = String::from_utf8(fixture("ipmi/kat.txt")).unwrap();
    for (i, line) in kat
        .lines()
        .filter_map(|l| l.strip_prefix("packet = "))
        .enumerate()
    {
        let name = ["datagram-kat-suite3", "datagram-kat-suite17"][i];
        s.insert(
            name,
            ipmi_input(IpmiMode::Datagram, &hex::decode(line).unwrap()),
        );
    }
    // Sealed: suite 17, encrypted IPMI payload (the body as on the wire).
    let sealed = encode_packet(PayloadType::Ipmi, 7, 9, &chassis, Some(&keys), [0x30; 16]).unwrap();
    let body_len = u16::from_le_bytes([sealed[14], sealed[15]]) as usize;
    let body = InputWriter::new()
        .byte(1)
        .byte(0x80)
        .u32(7)
        .u32(9)
        .bytes(&sealed[16..16 + body_len])
        .finish();
    s.insert(
        "sealed-encrypted-chassis",
        ipmi_input(IpmiMode::Sealed, &body),
    );
    let body = InputWriter::new()
        .byte(0)
        .byte(0x01)
        .u32(7)
        .u32(9)
        .bytes(
            &SolPacket {
                seq: 1,
                data: b"login:".to_vec(),
                ..Default::default()
            }
            .encode(),
        )
        .finish();
    s.insert("sealed-plain-sol", ipmi_input(IpmiMode::Sealed, &body));
    // A handshake where every answer is well formed, for each suite.
    for (suite, name) in [(0u8, "handshake-suite3"), (1, "handshake-suite17")] {
        let body = InputWriter::new()
            .byte(suite)
            .bytes(&[1, 0xfe, 0x10])
            .u32(0x0200_0a0b)
            .bytes(&[1, 0xff, 0x10])
            .bytes(&[0x5a; 32])
            .bytes(&[1, 0x00, 0x10])
            .bytes(&[0, 0, 0, 0, 0, 0, 0, 0, 0])
            .bytes(&chassis)
            .finish();
        s.insert(name, ipmi_input(IpmiMode::Handshake, &body));
    }
    s.insert(
        "responses-activate-payload",
        ipmi_input(
            IpmiMode::Responses,
            &[0, 0, 0, 0, 32, 0, 0x00, 0x40, 0x6F, 0x02, 0xFF, 0xFF],
        ),
    );
    s.insert(
        "responses-boot-flags",
        ipmi_input(IpmiMode::Responses, &[1, 5, 0x80, 0x04, 0, 0, 0]),
    );
    s.insert(
        "responses-cipher-suites",
        ipmi_input(
            IpmiMode::Responses,
            &[1, 0xC0, 3, 0x01, 0x41, 0x81, 0xC0, 17, 0x03, 0x44, 0x81],
        ),
    );
    s
}

fn sol_seeds() -> Seeds {
    use SolStep::*;
    let host = |seq: u8, text: &[u8]| {
        SolPacket {
            seq,
            data: text.to_vec(),
            ..Default::default()
        }
        .encode()
    };
    let ack = |seq: u8, n: u8| SolPacket::ack(seq, n).encode();
    let nack = SolPacket {
        ack_seq: 1,
        accepted: 0,
        flags: 0x40,
        ..Default::default()
    }
    .encode();
    let (p1, p2, a1, a2) = (
        host(1, b"login: "),
        host(2, b"Password:"),
        ack(1, 3),
        ack(2, 40),
    );
    let mut s = Seeds::new();
    s.insert(
        "console-session",
        sol_input(&[
            Packet {
                room: 64,
                bytes: &p1,
            },
            Poll(255),
            Write(6),
            Poll(2),
            Packet {
                room: 64,
                bytes: &a1,
            },
            Poll(255),
            Packet {
                room: 0,
                bytes: &p2,
            },
            Packet {
                room: 1,
                bytes: &p2,
            },
            Wait(1500),
            Poll(255),
            Packet {
                room: 64,
                bytes: &a2,
            },
            Break,
            Poll(255),
        ]),
    );
    s.insert(
        "nack-backoff",
        sol_input(&[
            Write(40),
            Poll(16),
            Packet {
                room: 8,
                bytes: &nack,
            },
            Poll(16),
            Wait(20),
            Poll(16),
        ]),
    );
    s.insert(
        "no-ack-retries",
        sol_input(&[
            Write(10),
            Poll(255),
            Wait(1100),
            Poll(255),
            Wait(1100),
            Poll(255),
            Wait(1100),
            Poll(255),
        ]),
    );
    s
}

fn config_seeds() -> Seeds {
    let mut s = Seeds::new();
    s.insert("agent-example", repo_file("lab-agent/agent.example.toml"));
    s.insert("packaging-agent", repo_file("packaging/etc/agent.toml"));
    s
}

fn names_seeds() -> Seeds {
    [
        ("mac-colons", "52:54:00:12:34:56"),
        ("mac-hyphens-upper", "52-54-00-AA-00-01"),
        ("host", "node-01.rack2"),
        ("lease-id", "7f1c4a8e-3b1d-4c2e-9a55-0d6b1f2e3a4b"),
        ("principal-server", "server"),
    ]
    .into_iter()
    .map(|(n, v)| (n, v.as_bytes().to_vec()))
    .collect()
}

fn server_message_seeds() -> Seeds {
    use pb::server_message::Msg;
    let host = pb::AgentHost {
        name: "h0".into(),
        arch: pb::Arch::X8664 as i32,
        firmware: pb::Firmware::Uefi as i32,
        mac: "52:54:00:00:00:01".into(),
        ipv4: "10.0.0.5".into(),
        lease_id: "7f1c4a8e-3b1d-4c2e-9a55-0d6b1f2e3a4b".into(),
        profile: "xen".into(),
        bmc: Some(pb::Bmc {
            address: "bmc-h0".into(),
            port: 623,
            user: "admin".into(),
            password: b"Hunter2Hunter2".to_vec(),
        }),
        console: Some(pb::ConsoleSpec {
            kind: pb::ConsoleKind::Serial as i32,
            target: "/dev/ttyS1".into(),
            baud: 0,
        }),
        ..Default::default()
    };
    let msg = |m: Msg| pb::ServerMessage { msg: Some(m) }.encode_to_vec();
    let command = |cmd| {
        msg(Msg::Command(pb::AgentCommand {
            id: 7,
            host: "h0".into(),
            cmd: Some(cmd),
        }))
    };
    use pb::agent_command::Cmd;
    let mut s = Seeds::new();
    s.insert(
        "rack",
        msg(Msg::Rack(pb::RackState {
            hosts: vec![host.clone()],
            ..Default::default()
        })),
    );
    s.insert("host", msg(Msg::Host(host)));
    s.insert(
        "power-cycle",
        command(Cmd::Power(pb::PowerAction::Cycle as i32)),
    );
    s.insert(
        "reclaim",
        command(Cmd::Reclaim(pb::Reclaim {
            lease_id: "7f1c4a8e-3b1d-4c2e-9a55-0d6b1f2e3a4b".into(),
            profile: "local-disk".into(),
        })),
    );
    s.insert(
        "log-read",
        command(Cmd::Log(pb::LogRead {
            from: Some(prost_types::Timestamp {
                seconds: 1_700_000_000,
                nanos: 5,
            }),
            to: None,
            window: 0,
        })),
    );
    s
}

fn console_log_seeds() -> Seeds {
    use lab_agent::console::log::{file_name, host_dir};
    use lab_agent::console::{ConsoleHost, ConsoleLog, LogLimits, RecordKind};
    let tmp = tempfile::tempdir().unwrap();
    let host = ConsoleHost::new("h").unwrap();
    let limits = LogLimits {
        max_file_bytes: 80,
        max_total_bytes: 1024,
    };
    let mut log = ConsoleLog::open(tmp.path(), &host, limits).unwrap();
    log.append(RecordKind::Data, 1000, b"Xen 4.17 booting\r\n")
        .unwrap();
    log.append(RecordKind::Gap, 2000, b"\r\n[console lost]\r\n")
        .unwrap();
    log.append(RecordKind::Data, 3000, b"login: ").unwrap();
    log.flush().unwrap();
    drop(log);
    let dir = host_dir(tmp.path(), &host);
    let files: Vec<(u8, Vec<u8>)> = (0..4)
        .filter_map(|n| {
            std::fs::read(dir.join(file_name(n)))
                .ok()
                .map(|b| (n as u8, b))
        })
        .collect();
    let refs: Vec<(u8, &[u8])> = files.iter().map(|(n, b)| (*n, &b[..])).collect();
    let mut s = Seeds::new();
    s.insert("rotated", console_log_input(0, u64::MAX, &refs));
    s.insert("slice", console_log_input(1500, 3000, &refs));
    let mut torn = files[0].1.clone();
    torn.truncate(torn.len() - 3);
    s.insert(
        "torn-tail",
        console_log_input(0, u64::MAX, &[(0, &torn), (5, &files[1].1)]),
    );
    s
}

fn inventory_seeds() -> Seeds {
    let mut s = Seeds::new();
    s.insert("repo-inventory", repo_file("inventory.toml"));
    s.insert(
        "packaging-inventory",
        repo_file("packaging/etc/inventory.toml"),
    );
    s
}

fn tokens_seeds() -> Seeds {
    let mut s = Seeds::new();
    s.insert("packaging-tokens", repo_file("packaging/etc/tokens.toml"));
    let digest = hex::encode(lab_server::auth::digest("lab_fuzz_known_token"));
    s.insert(
        "two-tokens",
        format!(
            "[[token]]\nprincipal = \"ci-osstest\"\nrole = \"ci\"\nsha256 = \"{digest}\"\n\n\
             [[token]]\nprincipal = \"agent-rack1\"\nrole = \"agent\"\nsha256 = \"{}\"\n",
            "ab".repeat(32)
        )
        .into_bytes(),
    );
    s.insert("bearer-known", b"Bearer lab_fuzz_known_token".to_vec());
    s
}

fn agent_message_seeds() -> Seeds {
    use pb::agent_message::Msg;
    let msg = |m: Msg| pb::AgentMessage { msg: Some(m) }.encode_to_vec();
    let mut s = Seeds::new();
    s.insert(
        "hello",
        msg(Msg::Hello(pb::AgentHello {
            rack: "rack1".into(),
            version: "0.1.0".into(),
        })),
    );
    s.insert(
        "report",
        msg(Msg::Report(pb::HostReport {
            host: "x86-01".into(),
            reachable: true,
            lease_id: "7f1c4a8e-3b1d-4c2e-9a55-0d6b1f2e3a4b".into(),
            phase: pb::ProvisionPhase::Booting as i32,
            stage: "power on".into(),
            ..Default::default()
        })),
    );
    s.insert(
        "reply-error",
        msg(Msg::Reply(pb::CommandReply {
            id: 3,
            error: "BMC unreachable".into(),
            code: pb::CommandErrorKind::Unavailable as i32,
            ..Default::default()
        })),
    );
    s.insert(
        "data",
        msg(Msg::Data(pb::SessionData {
            id: 3,
            output: b"login: ".to_vec(),
            ..Default::default()
        })),
    );
    s.insert(
        "lease-request",
        pb::LeaseRequest {
            arch: pb::Arch::X8664 as i32,
            flags: vec!["iommu".into()],
            hosts: vec!["x86-01".into(), "x86-02".into()],
            count: 2,
            profile: "xen".into(),
            ttl: Some(prost_types::Duration {
                seconds: 3600,
                nanos: 0,
            }),
            priority: 5,
            comment: "osstest flight 1234".into(),
            ssh_public_key: String::new(),
            preemptible: false,
            min_ttl: None,
        }
        .encode_to_vec(),
    );
    s.insert(
        "console-open",
        pb::ConsoleOpen {
            host: "x86-01".into(),
            write: true,
            replay_bytes: 4096,
            not_before: None,
        }
        .encode_to_vec(),
    );
    s
}

fn seeds(target: &str) -> Seeds {
    match target {
        "dhcp" => dhcp_seeds(),
        "tftp" => tftp_seeds(),
        "http" => http_seeds(),
        "ipmi" => ipmi_seeds(),
        "sol" => sol_seeds(),
        "agent_config" => config_seeds(),
        "names" => names_seeds(),
        "server_message" => server_message_seeds(),
        "console_log" => console_log_seeds(),
        "inventory" => inventory_seeds(),
        "tokens" => tokens_seeds(),
        "agent_message" => agent_message_seeds(),
        other => panic!("no seeds for {other}"),
    }
}

fn fuzz_dir(kind: &str, target: &str) -> PathBuf {
    repo().join("fuzz").join(kind).join(target)
}

/// The files of a directory by name (none if it does not exist).
fn files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return BTreeMap::new();
    };
    entries
        .map(|e| {
            let e = e.unwrap();
            let name = e.file_name().into_string().expect("UTF-8 file name");
            (name, std::fs::read(e.path()).unwrap())
        })
        .collect()
}

#[test]
fn seeds_are_written_from_the_fixtures() {
    let update = std::env::var_os("UPDATE_GOLDEN").is_some();
    for (target, _) in targets() {
        let want = seeds(target);
        let dir = fuzz_dir("seeds", target);
        if update {
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            for (name, bytes) in &want {
                std::fs::write(dir.join(name), bytes).unwrap();
            }
        }
        let want: BTreeMap<String, Vec<u8>> =
            want.into_iter().map(|(n, b)| (n.to_owned(), b)).collect();
        assert!(
            files(&dir) == want,
            "{} differs from the seeds written here (UPDATE_GOLDEN=1 to rewrite)",
            dir.display()
        );
    }
}

/// Every seed and every kept failure of every target, each in its own
/// `catch_unwind` so that one report names all the inputs that fail.
#[test]
fn seeds_and_regressions_pass() {
    let mut failed = Vec::new();
    let mut count = 0;
    for (target, run) in targets() {
        for kind in ["seeds", "regressions"] {
            for (name, bytes) in files(&fuzz_dir(kind, target)) {
                count += 1;
                if std::panic::catch_unwind(|| run(&bytes)).is_err() {
                    failed.push(format!("fuzz/{kind}/{target}/{name}"));
                }
            }
        }
    }
    assert!(
        failed.is_empty(),
        "inputs that fail their target: {failed:?}"
    );
    assert!(count >= 40, "only {count} inputs replayed");
}

#[test]
fn every_target_has_a_fuzz_binary_and_back() {
    let manifest =
        String::from_utf8(std::fs::read(repo().join("fuzz/Cargo.toml")).unwrap()).unwrap();
    let bins: Vec<&str> = manifest
        .lines()
        .filter_map(|l| l.strip_prefix("name = \""))
        .filter_map(|l| l.strip_suffix('"'))
        .filter(|n| *n != "lab-fuzz")
        .collect();
    let names: Vec<&str> = targets().map(|(n, _)| *n).collect();
    let mut sorted = names.clone();
    sorted.sort();
    let mut bins_sorted = bins.clone();
    bins_sorted.sort();
    assert_eq!(
        sorted, bins_sorted,
        "fuzz/Cargo.toml's binaries are the targets"
    );
    for name in names {
        let path = repo().join(format!("fuzz/fuzz_targets/{name}.rs"));
        let src =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(
            src.contains(&format!("::fuzzing::{name}(data)")),
            "{}",
            path.display()
        );
    }
}
