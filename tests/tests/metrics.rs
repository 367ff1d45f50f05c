//! `/metrics` of the real lab-server and lab-agent, scraped by the real
//! Prometheus (Debian's `prometheus`, which ships `promtool`): both
//! endpoints pass `promtool check metrics`, Prometheus scrapes both (a
//! generated config on loopback, 1 s interval), and the number of active
//! leases a PromQL query returns through Prometheus' HTTP API is the number
//! `lab lease list` shows. Bounded: every wait has a deadline.

use lab_tests::{ServerProcess, bin_path, inventory_toml_with_agent};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A child killed on drop.
struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn curl(url: &str, accept: Option<&str>) -> (bool, String) {
    let mut cmd = Command::new("curl");
    cmd.args(["-fsS", "--max-time", "5"]);
    if let Some(a) = accept {
        cmd.args(["-H", &format!("Accept: {a}")]);
    }
    let out = cmd
        .arg(url)
        .output()
        .expect("curl is needed: apt-get install curl");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

fn lab(server: &ServerProcess, token: &str, args: &[&str]) -> String {
    let out = Command::new(bin_path("lab"))
        .args(args)
        .env("LAB_SERVER", format!("http://{}", server.addr))
        .env("LAB_TOKEN", token)
        .output()
        .expect("lab is built");
    assert!(
        out.status.success(),
        "lab {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `promtool check metrics` on `text`: its complaints, empty when clean.
fn promtool_check(text: &str) -> String {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool is needed: apt-get install prometheus (scripts/deps.sh)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        said
    } else {
        format!("exit {:?}: {said}", out.status.code())
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Prometheus on loopback scraping `targets` (job name, host:port) every
/// second, its data in `dir`.
fn prometheus(dir: &Path, targets: &[(&str, String)]) -> (Killed, String) {
    let mut config =
        String::from("global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n");
    for (job, addr) in targets {
        config.push_str(&format!(
            "  - job_name: {job}\n    static_configs:\n      - targets: ['{addr}']\n"
        ));
    }
    let cfg = dir.join("prometheus.yml");
    std::fs::write(&cfg, config).unwrap();
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let child = Command::new("prometheus")
        .arg(format!("--config.file={}", cfg.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("tsdb").display()
        ))
        .arg(format!("--web.listen-address={listen}"))
        .stdout(Stdio::null())
        .stderr(Stdio::from(
            std::fs::File::create(dir.join("prometheus.log")).unwrap(),
        ))
        .spawn()
        .expect("prometheus is needed: apt-get install prometheus (scripts/deps.sh)");
    (Killed(child), format!("http://{listen}"))
}

/// The value of an instant PromQL query with one result, if it has one.
fn query(prom: &str, q: &str) -> Option<f64> {
    let url = format!(
        "{prom}/api/v1/query?query={}",
        q.replace(' ', "%20")
            .replace('"', "%22")
            .replace('{', "%7B")
            .replace('}', "%7D")
    );
    let (ok, body) = curl(&url, None);
    if !ok {
        return None;
    }
    let v: serde_json::Value = serde_json::from_str(&body).ok()?;
    let result = v["data"]["result"].as_array()?;
    if result.len() != 1 {
        return None;
    }
    result[0]["value"][1].as_str()?.parse().ok()
}

/// Polls `f` every 200 ms until it is `Some` that `ok` accepts, for at most
/// `timeout`.
fn wait_for<T: std::fmt::Debug>(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> Option<T>,
    ok: impl Fn(&T) -> bool,
    log: &Path,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        let last = match f() {
            Some(v) if ok(&v) => return v,
            v => v,
        };
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what} (last: {last:?}); log:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn prometheus_scrapes_the_server_and_an_agent() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::spawn_dev(dir.path(), &inventory_toml_with_agent(4)).unwrap();
    let web = server.web.expect("lab-server prints its web address");
    let assets = concat!(env!("CARGO_MANIFEST_DIR"), "/../pxe-assets");
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "rack = \"r1\"\nserver = \"http://{}\"\n[http]\nlisten = \"127.0.0.1:0\"\nurl = \"http://127.0.0.1:0\"\n[metrics]\nlisten = \"127.0.0.1:0\"\n[assets]\nroot = \"{assets}\"\n",
            server.addr
        ),
    )
    .unwrap();
    let mut child = Command::new(bin_path("lab-agent"))
        .args(["--config", config.to_str().unwrap(), "--token", "agent-r1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::from(
            std::fs::File::create(dir.path().join("agent.log")).unwrap(),
        ))
        .spawn()
        .expect("lab-agent is built");
    let stdout = child.stdout.take().unwrap();
    let _agent = Killed(child);
    let (mut http, mut metrics) = (String::new(), String::new());
    for line in BufReader::new(stdout).lines() {
        let line = line.unwrap();
        if let Some(a) = line.strip_prefix("lab-agent http listening on ") {
            http = a.to_owned();
        } else if let Some(a) = line.strip_prefix("lab-agent metrics listening on ") {
            metrics = a.to_owned();
        } else if line.starts_with("lab-agent running") {
            break;
        }
    }
    assert!(
        !metrics.is_empty() && !http.is_empty(),
        "agent did not start"
    );

    // The agent attached and its hosts reachable, as /metrics tells.
    let server_url = format!("http://{web}/metrics");
    wait_for(
        "the agent attached and its hosts reachable",
        Duration::from_secs(20),
        || Some(curl(&server_url, None).1),
        |t| t.contains("lab_agents_attached 1\n") && t.contains("lab_hosts_unreachable 0\n"),
        &server.log,
    );
    // Two leases from the CLI, and some boot traffic for the agent.
    for host in ["h00", "h01"] {
        lab(
            &server,
            "ci",
            &["lease", "acquire", "--host", host, "--no-wait"],
        );
    }
    let listed: serde_json::Value =
        serde_json::from_str(&lab(&server, "ci", &["--json", "lease", "list"])).unwrap();
    let cli_active = listed.as_array().map_or(0, |a| a.len());
    assert_eq!(cli_active, 2, "the CLI lists both leases: {listed:?}");
    // Answered whether or not the agent knows h00 yet: one request.
    curl(&format!("http://{http}/hosts/52-54-00-00-00-00.ipxe"), None);

    // Both endpoints pass promtool, in the text format it reads, and offer
    // OpenMetrics to a scraper that asks for it.
    let agent_url = format!("http://{metrics}/metrics");
    for url in [&server_url, &agent_url] {
        let (ok, text) = curl(url, None);
        assert!(ok, "GET {url}");
        let complaints = promtool_check(&text);
        assert!(
            complaints.is_empty(),
            "promtool check metrics {url}: {complaints}\n{text}"
        );
        let (ok, om) = curl(url, Some("application/openmetrics-text; version=1.0.0"));
        assert!(
            ok && om.ends_with("# EOF\n"),
            "OpenMetrics from {url}:\n{om}"
        );
    }
    let (_, text) = curl(&server_url, None);
    assert!(text.contains("lab_leases_active 2\n"), "{text}");
    let (_, text) = curl(&agent_url, None);
    assert!(text.contains("lab_agent_http_requests_total 1\n"), "{text}");

    let (_prom, prom) = prometheus(
        dir.path(),
        &[
            ("lab-server", web.to_string()),
            ("lab-agent", metrics.clone()),
        ],
    );
    let log = dir.path().join("prometheus.log");
    for job in ["lab-server", "lab-agent"] {
        wait_for(
            &format!("Prometheus scraping {job}"),
            Duration::from_secs(60),
            || query(&prom, &format!("up{{job=\"{job}\"}}")),
            |v| *v == 1.0,
            &log,
        );
    }
    let active = wait_for(
        "lab_leases_active in Prometheus",
        Duration::from_secs(20),
        || query(&prom, "lab_leases_active"),
        |_| true,
        &log,
    );
    assert_eq!(active, cli_active as f64, "PromQL and the CLI agree");
    let requests = wait_for(
        "the agent's HTTP requests in Prometheus",
        Duration::from_secs(20),
        || query(&prom, "lab_agent_http_requests_total"),
        |_| true,
        &log,
    );
    assert_eq!(requests, 1.0);
    let attached = wait_for(
        "lab_agents_attached in Prometheus",
        Duration::from_secs(20),
        || query(&prom, "lab_agents_attached"),
        |v| *v == 1.0,
        &log,
    );
    assert_eq!(attached, 1.0);
}
