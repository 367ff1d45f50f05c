//! The browser tests' runner: a Selenium script of `tests/browser/` in
//! Debian's python3 (where python3-selenium is installed), driving headless
//! Chromium through chromedriver (Debian's `chromium`, `chromium-driver`,
//! installed by `scripts/deps.sh`).

use std::path::Path;
use std::process::Command;

/// Panics naming the package to install when Chromium or chromedriver is
/// missing.
pub fn require_chromium() {
    for (bin, pkg) in [
        ("/usr/bin/chromium", "chromium"),
        ("/usr/bin/chromedriver", "chromium-driver"),
    ] {
        assert!(
            Path::new(bin).exists(),
            "{bin} is needed: apt-get install {pkg} (scripts/deps.sh)"
        );
    }
}

/// Runs `tests/browser/SCRIPT` with `env`; whether it passed, and what it
/// printed (stdout then stderr).
pub fn run_script(script: &str, env: &[(&str, &str)]) -> (bool, String) {
    require_chromium();
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("browser")
        .join(script);
    let out = Command::new("/usr/bin/python3")
        .arg(&path)
        .envs(env.iter().copied())
        .output()
        .expect("python3 with python3-selenium (scripts/deps.sh)");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), said)
}
