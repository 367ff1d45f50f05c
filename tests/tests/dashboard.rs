//! The dashboard in a real browser (headless Chromium through chromedriver,
//! driven by `tests/browser/dashboard.py` with Debian's python3-selenium)
//! against the real lab-server and lab-agent of [`lab_tests::console_lab`]
//! (host `h00`'s console is a terminal server that prints a Xen dom0 boot
//! tail and echoes each line it is sent). Loopback only; no VM. Screenshots
//! of every page are kept in `$CARGO_TARGET_TMPDIR/dashboard/` (docs/img/
//! has a few of them).

use lab_tests::bin_path;
use lab_tests::console_lab::ConsoleLab;

#[test]
fn the_dashboard_in_headless_chromium() {
    lab_tests::browser::require_chromium();
    let lab = ConsoleLab::start(&[
        ("tok-ci1", "ci1", "ci"),
        ("tok-dev2", "dev2", "developer"),
        ("tok-op3", "op3", "operator"),
    ]);
    let (server, web) = (&lab.server, lab.web);

    let out = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("dashboard");
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out).unwrap();
    let (passed, said) = lab_tests::browser::run_script(
        "dashboard.py",
        &[
            ("WEB_URL", &format!("http://{web}")),
            ("LAB", bin_path("lab").to_str().unwrap()),
            ("LAB_SERVER", &format!("http://{}", server.addr)),
            ("HOLDER_TOKEN", "tok-ci1"),
            ("OTHER_TOKEN", "tok-dev2"),
            ("OPERATOR_TOKEN", "tok-op3"),
            ("OUT", out.to_str().unwrap()),
        ],
    );
    println!("{said}");
    assert!(
        passed,
        "the browser checks failed (screenshots in {}):\n{said}\n--- server log ---\n{}\n--- agent log ---\n{}",
        out.display(),
        server.log_text(),
        lab.agent_log()
    );
    for page in [
        "login",
        "hosts",
        "queue",
        "leases",
        "lease",
        "host-holder",
        "host-nonholder",
        "host-quarantined",
    ] {
        let png = out.join(format!("{page}.png"));
        let bytes = std::fs::read(&png).unwrap_or_default();
        assert!(
            bytes.starts_with(b"\x89PNG"),
            "no screenshot {}",
            png.display()
        );
    }
}
