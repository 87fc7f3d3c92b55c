//! The operator features of the binaries as processes: `--config` with a real SIGHUP reload, the status page and
//! metrics listeners, JSON logs on both binaries, config errors naming the line, and the generated completions and
//! man pages that the Debian package ships.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};

const AGENT: &str = env!("CARGO_BIN_EXE_vcpu-agent");
const CONTROLLER: &str = env!("CARGO_BIN_EXE_vcpu-controller");
/// Only so that a broken build fails instead of hanging: nothing here is expected to take anywhere near this long.
const STUCK: std::time::Duration = std::time::Duration::from_secs(120);

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A plain HTTP/1.1 GET: (status line, body).
fn http_get(addr: &str, path: &str) -> (String, String) {
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).unwrap();
    let (head, body) = reply.split_once("\r\n\r\n").expect("head and body");
    (head.lines().next().unwrap_or("").to_string(), body.to_string())
}

/// Lines of a child's pipe, read on a thread so the child never blocks on a full pipe.
fn lines_of(r: impl Read + Send + 'static) -> Receiver<String> {
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        for l in BufReader::new(r).lines().map_while(Result::ok) {
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    rx
}

/// Reads JSON log lines until one has `message`; returns it. Every line read must be JSON.
fn wait_log(rx: &Receiver<String>, message: &str) -> serde_json::Value {
    loop {
        let line = rx.recv_timeout(STUCK).unwrap_or_else(|e| panic!("no log {message:?} ({e})"));
        let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(v["level"].is_string() && v["timestamp"].is_string(), "{line}");
        if v["fields"]["message"] == message {
            return v;
        }
    }
}

struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn signal(child: &Child, sig: libc::c_int) {
    let pid = libc::pid_t::try_from(child.id()).unwrap();
    // SAFETY: kill(2) on our own child's pid has no memory-safety concerns.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::kill(pid, sig) };
    assert_eq!(rc, 0, "kill failed");
}

/// The controller reads its hosts from `--config`; a real SIGHUP adds a host (which starts with a baseline) while
/// the first one keeps its baseline; a broken file is refused naming the line and changes nothing; the status
/// page's JSON and the metrics are served on the addresses it logs; SIGTERM stops it with 0.
#[test]
fn config_file_sighup_reload_status_page_and_metrics() {
    let a = common::AgentProcess::start(&["--backend", "sim", "--scenario", "split-first-last"]);
    let b = common::AgentProcess::start(&["--backend", "sim", "--scenario", "all-on-one"]);
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("controller.toml");
    // A deadline far above the interval: on a loaded machine a slow RPC then only delays a round, instead of
    // failing it and taking a fresh baseline, which is exactly what this test checks does not happen on reload.
    let write_cfg = |hosts: &[&str]| {
        let list: Vec<String> = hosts.iter().map(|h| format!("{h:?}")).collect();
        std::fs::write(
            &cfg,
            format!("hosts = [{}]\ninterval = \"100ms\"\nrpc_timeout = \"1s\"\nhttp_listen = \"127.0.0.1:0\"\n[policy]\nthreshold = 10\n", list.join(", ")),
        )
        .unwrap();
    };
    write_cfg(&[&a.addr]);
    let mut child = Command::new(CONTROLLER)
        .args(["run", "--json", "--log-format", "json", "--config"])
        .arg(&cfg)
        .args(["--metrics-listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = lines_of(child.stdout.take().unwrap());
    let err = lines_of(child.stderr.take().unwrap());
    let child = Killed(child);
    let first = wait_log(&err, "http listening");
    let second = wait_log(&err, "http listening");
    let addrs: Vec<String> =
        [first, second].iter().map(|v| v["fields"]["addr"].as_str().unwrap().to_string()).collect();

    let reports = |n: usize, host: &str| -> Vec<serde_json::Value> {
        let mut got = Vec::new();
        while got.iter().filter(|r: &&serde_json::Value| r["host"] == host).count() < n {
            let line = out.recv_timeout(STUCK).expect("controller still reporting");
            got.push(serde_json::from_str(&line).unwrap());
        }
        got
    };
    let mut all = reports(3, &a.addr);
    // Exactly one of the two listeners serves the page; both serve /metrics.
    let pages: Vec<&String> = addrs.iter().filter(|x| http_get(x, "/api/state").0.contains("200")).collect();
    assert_eq!(pages.len(), 1, "{addrs:?}");
    let (_, state) = http_get(pages[0], "/api/state");
    let v: serde_json::Value = serde_json::from_str(&state).unwrap();
    assert_eq!(v["hosts"][0]["host"], a.addr.as_str(), "{v}");
    assert_eq!(v["config"]["interval_ms"], 100);
    for x in &addrs {
        let (status, body) = http_get(x, "/metrics");
        assert!(status.contains("200"), "{x}: {status}");
        assert!(body.contains(&format!("vcpu_balancer_host_up{{host=\"{}\"}} 1", a.addr)), "{body}");
    }

    write_cfg(&[&a.addr, &b.addr]);
    signal(&child.0, libc::SIGHUP);
    all.extend(reports(3, &b.addr));

    // A broken file is refused, naming the line; both hosts keep running.
    std::fs::write(&cfg, "hosts = [\"x\"]\ninterval = \"1ms\"\n").unwrap();
    signal(&child.0, libc::SIGHUP);
    let refused = wait_log(&err, "reload refused; the current hosts keep running");
    assert!(refused["fields"]["error"].as_str().unwrap().contains("line 2"), "{refused}");
    all.extend(reports(3, &a.addr));
    all.extend(reports(3, &b.addr));

    let ra: Vec<&serde_json::Value> = all.iter().filter(|r| r["host"] == a.addr.as_str()).collect();
    let rb: Vec<&serde_json::Value> = all.iter().filter(|r| r["host"] == b.addr.as_str()).collect();
    assert_eq!(ra.iter().filter(|r| r["action"]["type"] == "baseline").count(), 1, "a kept its baseline: {ra:#?}");
    assert_eq!(rb[0]["action"]["type"], "baseline", "b starts with a baseline");
    for (i, r) in ra.iter().enumerate() {
        assert_eq!(r["round"], i as u64 + 1, "a's rounds go on without restarting");
    }

    let mut child = child;
    signal(&child.0, libc::SIGTERM);
    let status = child.0.wait().unwrap();
    assert!(status.success(), "{status:?}");
}

/// `--log-format json` on the controller: every stderr line is a JSON object with the structured fields.
#[test]
fn controller_json_logs() {
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let out = Command::new(CONTROLLER)
        .args(["run", "--host", &dead, "--rounds", "2", "--interval", "100ms", "--rpc-timeout", "50ms"])
        .args(["--log-format", "json"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(69), "the host stayed down: {}", text(&out.stderr));
    let stderr = text(&out.stderr);
    let lines: Vec<serde_json::Value> =
        stderr.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"))).collect();
    let failed: Vec<_> = lines.iter().filter(|v| v["fields"]["message"] == "round failed").collect();
    assert_eq!(failed.len(), 2, "{stderr}");
    assert_eq!(failed[0]["fields"]["host"], dead.as_str());
    assert_eq!(failed[0]["level"], "WARN");
}

/// The agent with `--metrics-listen` and JSON logs: after a few RPCs, /metrics shows them and the simulator calls.
#[test]
fn agent_metrics_listener_and_json_logs() {
    let mut child = Command::new(AGENT)
        .args(["--backend", "sim", "--scenario", "balanced", "--listen", "127.0.0.1:0"])
        .args(["--metrics-listen", "127.0.0.1:0", "--log-format", "json"])
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let err = lines_of(child.stderr.take().unwrap());
    let _child = Killed(child);
    // The two listeners start concurrently, so their lines come in either order.
    let (mut metrics, mut grpc) = (None, None);
    while metrics.is_none() || grpc.is_none() {
        let line = err.recv_timeout(STUCK).expect("the agent logs its listeners");
        let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        let addr = v["fields"]["addr"].as_str().map(str::to_string);
        match v["fields"]["message"].as_str() {
            Some("http listening") => metrics = addr,
            Some("agent listening") => grpc = addr,
            _ => {}
        }
    }
    let (metrics, grpc) = (metrics.unwrap(), grpc.unwrap());
    let show = Command::new(CONTROLLER).args(["show", "--host", &grpc, "--window", "100ms"]).output().unwrap();
    assert!(show.status.success(), "{}", text(&show.stderr));
    let (status, body) = http_get(&metrics, "/metrics");
    assert!(status.contains("200"), "{status}");
    for needle in [
        r#"vcpu_balancer_agent_rpc_duration_seconds_count{method="GetStats"} 2"#,
        r#"vcpu_balancer_agent_rpc_duration_seconds_count{method="GetHostInfo"} 1"#,
        r#"vcpu_balancer_hypervisor_call_duration_seconds_count{backend="sim",operation="stats"} 2"#,
    ] {
        assert!(body.lines().any(|l| l == needle), "missing {needle} in\n{body}");
    }
}

/// An invalid config file is refused with exit 64 and the line named; flags override the file.
#[test]
fn bad_config_files_are_refused_with_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.toml");
    std::fs::write(&cfg, "hosts = [\"a\"]\n\n[policy]\nthreshold = 101\n").unwrap();
    let out = Command::new(CONTROLLER).args(["run", "--config"]).arg(&cfg).output().unwrap();
    assert_eq!(out.status.code(), Some(64), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("line 4: threshold: must be between 0 and 100"), "{}", text(&out.stderr));
    // No host anywhere.
    std::fs::write(&cfg, "interval = \"1s\"\n").unwrap();
    let out = Command::new(CONTROLLER).args(["run", "--config"]).arg(&cfg).output().unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(text(&out.stderr).contains("no host to balance"), "{}", text(&out.stderr));
    std::fs::write(&cfg, "hosts = [\"h:99999\"]\n").unwrap();
    let out = Command::new(CONTROLLER).args(["run", "--config"]).arg(&cfg).output().unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(text(&out.stderr).contains("line 1: hosts: invalid port"), "{}", text(&out.stderr));
    // Flags override the file: the report is for the flag's host, with the flag's threshold.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string();
    std::fs::write(&cfg, "hosts = [\"file-host\"]\ninterval = \"5s\"\n").unwrap();
    let out = Command::new(CONTROLLER)
        .args(["run", "--json", "--rounds", "1", "--interval", "100ms", "--rpc-timeout", "50ms", "--host", &dead])
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(69), "the flag's host is down: {}", text(&out.stderr));
    let r: serde_json::Value = serde_json::from_str(text(&out.stdout).trim()).unwrap();
    assert_eq!(r["host"], dead.as_str());
}

/// Completions and man pages come from the clap definitions of both binaries.
#[test]
fn completions_and_man_pages() {
    let run = |bin: &str, args: &[&str]| {
        let out = Command::new(bin).args(args).output().unwrap();
        assert!(out.status.success(), "{bin} {args:?}: {}", text(&out.stderr));
        text(&out.stdout)
    };
    let bash = run(CONTROLLER, &["completions", "bash"]);
    assert!(bash.contains("complete -F _vcpu__controller") && bash.contains("--http-listen"), "{bash}");
    assert!(run(CONTROLLER, &["completions", "zsh"]).contains("#compdef vcpu-controller"));
    assert!(run(CONTROLLER, &["completions", "fish"]).contains("complete -c vcpu-controller"));
    let man = run(CONTROLLER, &["man"]);
    assert!(man.starts_with(".ie") || man.contains(".TH vcpu-controller"), "{man}");
    assert!(man.contains("run") && man.contains("completions"));
    let man = run(AGENT, &["--man"]);
    assert!(man.contains(".TH vcpu-agent") && man.contains("metrics\\-listen"), "{man}");
    assert!(run(AGENT, &["--completions", "bash"]).contains("--metrics-listen"));
    // --man is exclusive: it refuses other flags rather than ignoring them.
    let out = Command::new(AGENT).args(["--man", "--backend", "sim"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}

/// The config file's `[policy]` and `[tls]` tables reach the running controller: with the fleet's certificates in
/// `[tls]` it balances a TLS agent, and without them the same agent refuses it (so TLS really came from the file).
#[test]
fn config_file_policy_and_tls_reach_a_tls_agent() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("fleet");
    let out = Command::new(CONTROLLER).args(["certs", "--host", "127.0.0.1", "--out"]).arg(&certs).output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let p = |f: &str| certs.join(f).display().to_string();
    let agent = common::AgentProcess::start(&[
        "--backend",
        "sim",
        "--scenario",
        "all-on-one",
        "--tls-cert",
        &p("agent-127.0.0.1.crt"),
        "--tls-key",
        &p("agent-127.0.0.1.key"),
        "--tls-ca",
        &p("ca.crt"),
    ]);
    let base = format!(
        "hosts = [\"{}\"]\ninterval = \"100ms\"\nrpc_timeout = \"2s\"\n[policy]\nname = \"seed\"\nexclude = [\"nothing-*\"]\n",
        agent.addr
    );
    // The exit code says whether the host's last round succeeded (0) or failed (69).
    let run = |toml: &str, code: i32| -> Vec<serde_json::Value> {
        let cfg = dir.path().join("controller.toml");
        std::fs::write(&cfg, toml).unwrap();
        let out = Command::new(CONTROLLER).args(["run", "--json", "--rounds", "3", "--config"]).arg(&cfg).output().unwrap();
        assert_eq!(out.status.code(), Some(code), "{}", text(&out.stderr));
        text(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    };
    let tls = format!(
        "{base}[tls]\ncert = {:?}\nkey = {:?}\nca = {:?}\n",
        p("controller.crt"),
        p("controller.key"),
        p("ca.crt")
    );
    let reports = run(&tls, 0);
    assert_eq!(reports.len(), 3, "{reports:?}");
    assert!(reports.iter().all(|r| r["action"]["type"] != "error"), "{reports:?}");
    assert!(reports.iter().any(|r| r["action"]["type"] == "move"), "all-on-one needs a move: {reports:?}");
    let reports = run(&base, 69);
    assert!(reports.iter().all(|r| r["action"]["type"] == "error"), "plaintext to a TLS agent: {reports:?}");
    // The reason says what is wrong in the operator's words, not only HTTP/2's.
    let says = |r: &serde_json::Value| r["action"]["reason"].as_str().unwrap_or("").contains("an agent that wants TLS");
    assert!(reports.iter().all(says), "{reports:?}");
}
