//! The two binaries as an operator runs them: flags, exit codes, messages, `--json` output, manual pins and the
//! demo. The agent is started as a real process on 127.0.0.1:0 and found through its log line.

mod common;

use std::process::Command;

const AGENT: &str = env!("CARGO_BIN_EXE_vcpu-agent");
const CONTROLLER: &str = env!("CARGO_BIN_EXE_vcpu-controller");

/// A `vcpu-agent --backend sim` process with a scenario.
struct Agent;

impl Agent {
    fn start(scenario: &str) -> common::AgentProcess {
        common::AgentProcess::start(&["--backend", "sim", "--scenario", scenario])
    }
}

fn controller(args: &[&str]) -> std::process::Output {
    Command::new(CONTROLLER).args(args).output().expect("run vcpu-controller")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The README's first command: the demo balances every simulated host and exits 0 with a summary.
#[test]
fn demo_balances_and_exits_zero() {
    let out = controller(&["demo", "--interval", "100ms"]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", text(&out.stderr));
    let summary = stdout.split("\nsummary\n").nth(1).expect("a summary");
    assert_eq!(summary.matches("balanced at round").count(), 3, "{summary}");
    assert!(stdout.contains("move vm"), "the demo shows moves");
    assert!(stdout.contains("pCPU 3 |"), "the demo shows bars");
}

/// `pin` applies through the agent; bad pins exit non-zero with the agent's error and change nothing.
#[test]
fn manual_pin_and_refusals() {
    let agent = Agent::start("balanced");
    let ok = controller(&["pin", "--host", &agent.addr, "--domain", "vm1", "--vcpu", "0", "--pcpu", "2"]);
    assert!(ok.status.success(), "{}", text(&ok.stderr));
    assert!(text(&ok.stdout).contains("pinned vm1 vCPU 0 to pCPU 2"));

    for (args, code) in [
        (vec!["--domain", "vm1", "--vcpu", "0", "--pcpu", "9"], "InvalidArgument"),
        (vec!["--domain", "vm1", "--vcpu", "4", "--pcpu", "1"], "InvalidArgument"),
        (vec!["--domain", "nope", "--vcpu", "0", "--pcpu", "1"], "NotFound"),
    ] {
        let mut full = vec!["pin", "--host", &agent.addr];
        full.extend(args);
        let out = controller(&full);
        assert!(!out.status.success());
        assert!(text(&out.stderr).contains(code), "{full:?}: {}", text(&out.stderr));
    }
    // The refused pins left vm1 where the good one put it.
    let show = controller(&["show", "--host", &agent.addr, "--window", "300ms"]);
    assert!(show.status.success(), "{}", text(&show.stderr));
    let table = text(&show.stdout);
    let line = table.lines().find(|l| l.contains("pCPU   2")).unwrap();
    assert!(line.contains("vm1/0"), "{table}");
}

/// `run --json` prints one object per host per round with the documented fields.
#[test]
fn run_json_output() {
    let agent = Agent::start("all-on-one");
    let out = controller(&["run", "--host", &agent.addr, "--rounds", "3", "--interval", "200ms", "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let rounds: Vec<serde_json::Value> =
        text(&out.stdout).lines().map(|l| serde_json::from_str(l).expect("one JSON object per line")).collect();
    assert_eq!(rounds.len(), 3);
    assert_eq!(rounds[0]["action"]["type"], "baseline");
    let r = &rounds[1];
    assert_eq!(r["host"], agent.addr.as_str());
    assert_eq!(r["round"], 2);
    assert_eq!(r["pcpus"].as_array().unwrap().len(), 4);
    assert_eq!(r["vcpus"].as_array().unwrap().len(), 8);
    assert!(r["vcpus"][0]["usage"].as_f64().is_some());
    assert!(r["spread"].as_f64().unwrap() > 90.0);
    assert_eq!(r["action"]["type"], "move");
    assert_eq!(r["action"]["from"], 0);
    // The default policy (converge) sees pCPU 0 saturated (its vCPUs read a fair share, not their demand), so it
    // first moves one vCPU onto each other pCPU and plans the rest on the next reading; `action` shows the first
    // move and `moves` lists them all.
    let moves = r["moves"].as_array().unwrap();
    assert_eq!(moves.len(), 3, "{r}");
    assert!(moves.iter().all(|m| m["from"] == 0 && m["to"] != 0), "{r}");
    let targets: std::collections::BTreeSet<_> = moves.iter().map(|m| m["to"].as_u64()).collect();
    assert_eq!(targets.len(), 3, "one onto each other pCPU: {r}");
    assert_eq!(r["pins_applied"], 3);
    // The human lines go to stderr, one per host per round.
    assert!(text(&out.stderr).matches(" round ").count() >= 3, "{}", text(&out.stderr));
    // Not a terminal: no colour codes in the log.
    assert!(!text(&out.stderr).contains('\x1b'), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains(" round=2 "), "{}", text(&out.stderr));
    assert_eq!(r["deferred_moves"], 0, "{r}");
}

/// `--max-moves` reaches the policy from the flag, from its environment variable and from the config file (flag
/// over file): the same round that moves 3 vCPUs above moves 1 or 2, and says how many it left for later.
#[test]
fn max_moves_from_the_flag_the_env_and_the_file() {
    let dir = std::env::temp_dir().join(format!("vcpu-cli-max-moves-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("controller.toml");
    std::fs::write(&file, "[policy]\nmax_moves = 2\n").unwrap();
    let file = file.to_str().unwrap();
    for (args, env, want) in [
        (vec!["--max-moves", "1"], None, 1),
        (vec![], Some("1"), 1),
        (vec!["--config", file], None, 2),
        (vec!["--config", file, "--max-moves", "1"], None, 1),
    ] {
        let agent = Agent::start("all-on-one");
        let mut cmd = Command::new(CONTROLLER);
        cmd.args(["run", "--host", &agent.addr, "--rounds", "2", "--interval", "200ms", "--json"]).args(&args);
        if let Some(v) = env {
            cmd.env("VCPU_MAX_MOVES", v);
        }
        let out = cmd.output().expect("run vcpu-controller");
        assert!(out.status.success(), "{args:?}: {}", text(&out.stderr));
        let last: serde_json::Value = serde_json::from_str(text(&out.stdout).lines().last().unwrap()).unwrap();
        assert_eq!(last["moves"].as_array().unwrap().len(), want, "{args:?} {env:?}: {last}");
        assert_eq!(last["deferred_moves"], 3 - want, "{args:?} {env:?}: {last}");
        let reason = last["action"]["reason"].as_str().unwrap();
        assert!(reason.contains(&format!("--max-moves {want}: the plan has 3 moves")), "{reason}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `--exclude` patterns from a comma list are trimmed: `VCPU_EXCLUDE='x, vm*'` protects the `vm*` domains (a
/// glob " vm*" would match none of them, and the balancer would move them).
#[test]
fn exclude_patterns_from_a_list_are_trimmed() {
    let agent = Agent::start("all-on-one");
    let out = Command::new(CONTROLLER)
        .args(["run", "--host", &agent.addr, "--rounds", "2", "--interval", "200ms", "--dry-run", "--json"])
        .env("VCPU_EXCLUDE", "x, vm*")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let last: serde_json::Value = serde_json::from_str(text(&out.stdout).lines().last().unwrap()).unwrap();
    assert_eq!(last["moves"].as_array().unwrap().len(), 0, "{last}");
    let held = last["held"].as_array().unwrap();
    assert_eq!(held.len(), 8, "{last}");
    assert!(held.iter().all(|h| h["why"] == "excluded"), "{last}");
}

/// A scenario's `hostname` is what the simulated host reports, unless `--sim-hostname` says otherwise.
#[test]
fn a_scenario_names_its_host() {
    let file = std::env::temp_dir().join(format!("vcpu-cli-hostname-{}.toml", std::process::id()));
    std::fs::write(&file, "pcpus = 2\nhostname = \"rack7-hv3\"\n[[domain]]\nname = \"a\"\nload = 10\n").unwrap();
    for (extra, want) in [(vec![], "rack7-hv3 (sim backend"), (vec!["--sim-hostname", "other"], "other (sim backend")] {
        let agent = common::AgentProcess::start(&[&["--backend", "sim", "--scenario", file.to_str().unwrap()], &extra[..]].concat());
        let show = controller(&["show", "--host", &agent.addr, "--window", "100ms"]);
        assert!(text(&show.stdout).starts_with(want), "{extra:?}: {}{}", text(&show.stdout), text(&show.stderr));
    }
    std::fs::remove_file(file).unwrap();
}

/// Malformed flags and files are refused with a clear message before anything runs.
#[test]
fn bad_input_is_refused() {
    for (args, needle) in [
        (vec!["run", "--host", "a:1", "--interval", "0s"], "interval"),
        (vec!["run", "--host", "a:1", "--threshold", "200"], "between 0 and 100"),
        (vec!["run", "--host", "a b"], "invalid address"),
        (vec!["run", "--host", "a:1", "--max-moves", "0"], "use --dry-run"),
        (vec!["evaluate", "--max-moves", "two"], "not a whole number greater than zero"),
        (vec!["run"], "--host"),
        // --no-guard means --policy seed: with another policy, which one was meant is unknown.
        (vec!["run", "--host", "a:1", "--no-guard", "--policy", "converge"], "cannot be used with"),
        (vec!["demo", "--no-guard", "--policy", "guarded"], "cannot be used with"),
        (vec!["pin", "--host", "a:1", "--domain", "x", "--vcpu", "0", "--pcpu", "3-1"], "start after end"),
        (vec!["run", "--host", "a:1", "--exclude", " "], "empty pattern"),
        (vec!["run", "--host", "a:1", "--rounds", "0"], "greater than zero"),
        // Numbers that used to panic (a semaphore's limit, a duration overflow) instead of being refused.
        (vec!["run", "--host", "a:1", "--max-inflight", "18446744073709551615"], "from 1 to"),
        (vec!["run", "--host", "a:1", "--rpc-timeout", "18446744073709551615s"], "at most"),
        (vec!["run", "--host", "a:1", "--interval", "400days"], "at most"),
        (vec!["run", "--host", "a:1", "--rpc-timeout", "1ns"], "at least 10ms"),
        (vec!["pin", "--host", "a:1", "--domain", "x", "--vcpu", "0", "--pcpu", "0", "--rpc-timeout", "1us"], "at least 10ms"),
        // Zero rounds would print a table of "never" (evaluate) or a spread of NaN (demo), read as results.
        (vec!["evaluate", "--rounds", "0"], "greater than zero"),
        (vec!["demo", "--max-rounds", "0"], "greater than zero"),
    ] {
        let out = controller(&args);
        assert!(!out.status.success(), "{args:?} accepted");
        assert!(text(&out.stderr).contains(needle), "{args:?}: {}", text(&out.stderr));
    }

    // A file that cannot be read is named once, with its error said once (not again as the error's cause).
    for args in [
        &["evaluate", "--scenarios", "/no/such/dir"][..],
        &["run", "--config", "/no/such/file.toml"],
        &["run", "--host", "a:1", "--tls-cert", "/no/cert", "--tls-key", "/no/key", "--tls-ca", "/no/ca"],
    ] {
        let out = controller(args);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {}", text(&out.stderr));
        assert_eq!(text(&out.stderr).matches("No such file or directory").count(), 1, "{args:?}: {}", text(&out.stderr));
    }

    // The same through the environment.
    let out = Command::new(CONTROLLER).args(["run", "--host", "a:1", "--policy", "converge"]).env("VCPU_NO_GUARD", "true").output().unwrap();
    assert!(!out.status.success(), "VCPU_NO_GUARD with --policy converge accepted");
    assert!(text(&out.stderr).contains("cannot be used with"), "{}", text(&out.stderr));
    // A switch that is set but off is no --no-guard: nothing conflicts (the run then fails only on its host).
    let out = Command::new(CONTROLLER)
        .args(["run", "--host", "127.0.0.1:1", "--policy", "converge", "--rounds", "1"])
        .env("VCPU_NO_GUARD", "0")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(69), "VCPU_NO_GUARD=0 with --policy converge: {}", text(&out.stderr));

    let dir = std::env::temp_dir().join(format!("vcpu-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "pcpus = 2\n[[domain]]\nname = \"a\"\nload = 150\n").unwrap();
    let out = Command::new(AGENT).args(["--backend", "sim", "--listen", "127.0.0.1:0", "--scenario"]).arg(&bad).output().unwrap();
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("line 4"), "{}", text(&out.stderr));
    // A state directory under a file cannot be made: refused before any host is contacted.
    let under_a_file = bad.join("state");
    let out = controller(&["run", "--host", "127.0.0.1:1", "--state-dir", under_a_file.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("cannot create it"), "{}", text(&out.stderr));
    let out = Command::new(AGENT).args(["--backend", "sim", "--listen", "127.0.0.1:0", "--scenario", "no-such"]).output().unwrap();
    assert!(text(&out.stderr).contains("not a built-in scenario"), "{}", text(&out.stderr));
    // A flag of the other backend would be ignored: refused when typed, only warned about when it comes from the
    // environment (which a unit file may share between both).
    for (args, needle) in [
        (["--backend", "sim", "--uri", "test:///default"], "--uri only applies to --backend libvirt"),
        (["--backend", "sim", "--libvirt-timeout", "5s"], "--libvirt-timeout only applies to --backend libvirt"),
        (["--backend", "libvirt", "--scenario", "balanced"], "--scenario only applies to --backend sim"),
        (["--backend", "libvirt", "--sim-hostname", "hv9"], "--sim-hostname only applies to --backend sim"),
    ] {
        let out = Command::new(AGENT).args(["--listen", "127.0.0.1:0"]).args(args).output().unwrap();
        assert_eq!(out.status.code(), Some(64), "{args:?} accepted: {}", text(&out.stderr));
        assert!(text(&out.stderr).contains(needle), "{args:?}: {}", text(&out.stderr));
    }
    let out = Command::new(AGENT)
        .args(["--backend", "sim", "--listen", "127.0.0.1:0", "--scenario", "no-such"])
        .env("VCPU_AGENT_URI", "test:///default")
        .output()
        .unwrap();
    let err = text(&out.stderr);
    assert!(err.contains("VCPU_AGENT_URI is set, but it only applies to --backend libvirt") && err.contains("not a built-in"), "{err}");
    // A simulated fleet that would run past the last port is refused as such, before anything listens.
    let out = Command::new(AGENT)
        .args(["--backend", "sim", "--listen", "127.0.0.1:0", "--listen-base", "65530", "--sim-hosts", "10"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("needs ports up to 65539, past 65535"), "{}", text(&out.stderr));
    // An identity list that expanded to nothing must not fall back to the default pinner.
    for allow in [" ", "vcpu-controller,,ops"] {
        let out = Command::new(AGENT).args(["--backend", "sim", "--listen", "127.0.0.1:0", "--pin-allow", allow]).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "--pin-allow {allow:?} accepted: {}", text(&out.stderr));
        assert!(text(&out.stderr).contains("empty identity"), "{}", text(&out.stderr));
    }
    for (timeout, needle) in [("10ms", "at least 100ms"), ("soon", "expected e.g. 2s"), ("0s", "greater than zero")] {
        let out = Command::new(AGENT)
            .args(["--backend", "libvirt", "--listen", "127.0.0.1:0", "--libvirt-timeout", timeout])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "--libvirt-timeout {timeout} accepted: {}", text(&out.stderr));
        assert!(text(&out.stderr).contains(needle), "--libvirt-timeout {timeout}: {}", text(&out.stderr));
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `run --rounds N` tells a script whether every host ended reachable: 69 when a host's last round failed, naming
/// it, even if another host was balanced.
#[test]
fn a_run_whose_host_stayed_down_exits_69() {
    let agent = Agent::start("balanced");
    let out = controller(&["run", "--host", agent.addr.as_str(), "--host", "127.0.0.1:1", "--rounds", "2", "--interval", "100ms"]);
    assert_eq!(out.status.code(), Some(69), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(err.lines().any(|l| l.contains("last round failed") && l.contains("host=127.0.0.1:1")), "{err}");
    assert!(!err.lines().any(|l| l.contains("last round failed") && l.contains(agent.addr.as_str())), "{err}");
    let out = controller(&["run", "--host", agent.addr.as_str(), "--rounds", "2", "--interval", "100ms", "--dry-run"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
}

/// A pin to a host that is down fails with a non-zero exit and says so.
#[test]
fn pin_to_a_down_host_fails() {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    drop(l);
    let out = controller(&["pin", "--host", &addr, "--domain", "x", "--vcpu", "0", "--pcpu", "0", "--rpc-timeout", "1s"]);
    assert!(!out.status.success());
    // Nothing was sent, so nothing changed, and no agent refused anything.
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(69), "{err}");
    assert!(err.contains("pin not sent (nothing changed): cannot reach"), "{err}");
    assert!(!err.contains("pin refused"), "{err}");
}

/// A connection that fails with the pin on it: the agent may have applied it, so it is "not confirmed".
#[test]
fn a_pin_whose_connection_drops_is_not_called_refused() {
    // Reads the request, then closes the connection without an answer.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let server = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let mut buf = [0u8; 4096];
        let mut got = 0;
        // The client preface and SETTINGS, then the request's HEADERS and DATA.
        while got < 120 {
            match std::io::Read::read(&mut s, &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => got += n,
            }
        }
    });
    let out = controller(&["pin", "--host", &addr, "--domain", "x", "--vcpu", "0", "--pcpu", "0", "--rpc-timeout", "5s"]);
    server.join().unwrap();
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(69), "{err}");
    assert!(err.contains("pin not confirmed") && err.contains("the agent may still apply it"), "{err}");
    assert!(!err.contains("refused"), "{err}");
}

/// A pin whose answer does not come in time is not reported as refused: the request may have reached the agent.
#[test]
fn a_pin_without_an_answer_is_not_called_refused() {
    // Accepts, never answers.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let out = controller(&["pin", "--host", &addr, "--domain", "x", "--vcpu", "0", "--pcpu", "0", "--rpc-timeout", "300ms"]);
    drop(l);
    assert_eq!(out.status.code(), Some(69), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(err.contains("pin not confirmed") && err.contains("the agent may still apply it"), "{err}");
    assert!(err.contains(&format!("vcpu-controller show --host {addr}")), "{err}");
    assert!(!err.contains("refused"), "{err}");
}

/// Without the libvirt feature the agent refuses `--backend libvirt` and says how to rebuild.
#[cfg(not(feature = "libvirt"))]
#[test]
fn agent_without_libvirt_says_how_to_rebuild() {
    let out = Command::new(AGENT).args(["--backend", "libvirt", "--listen", "127.0.0.1:0"]).output().unwrap();
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("--features libvirt"), "{}", text(&out.stderr));
}

/// `evaluate` prints a row per scenario and policy, the same every run, and `--policy` picks the policies.
#[test]
fn evaluate_is_deterministic_and_filters_policies() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/scenarios");
    let args = ["evaluate", "--scenarios", dir, "--rounds", "40"];
    let a = controller(&args);
    assert!(a.status.success(), "{}", text(&a.stderr));
    assert_eq!(text(&a.stdout), text(&controller(&args).stdout), "same input, same output");
    let files = std::fs::read_dir(dir).unwrap().filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "toml")).count();
    assert_eq!(text(&a.stdout).lines().count(), 2 + 3 * files, "{}", text(&a.stdout));
    let j = controller(&["evaluate", "--scenarios", dir, "--rounds", "40", "--policy", "guarded", "--json"]);
    let rows: Vec<serde_json::Value> = text(&j.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(rows.len(), files);
    assert!(rows.iter().all(|r| r["policy"] == "guarded"));
    let bad = controller(&["evaluate", "--scenarios", dir, "--policy", "best"]);
    assert!(!bad.status.success() && text(&bad.stderr).contains("unknown policy"), "{}", text(&bad.stderr));
}

/// The cells of a Markdown table row, trimmed.
fn cells(row: &str) -> Vec<String> {
    row.trim().trim_matches('|').split('|').map(|c| c.trim().to_string()).collect()
}

/// POLICIES.md's tables are what `evaluate` prints today: every row of the suite's table, the `guarded` and
/// `converge now` columns of "Beyond the suite" on the hosts `scripts/random-hosts` writes, both policies on those
/// of `scripts/random-mixed-hosts`, and `converge` under `--max-moves`. A policy change that
/// moves a number fails here until the page says so.
#[test]
fn policies_md_tables_are_what_evaluate_prints() {
    let root = env!("CARGO_MANIFEST_DIR");
    let doc = std::fs::read_to_string(format!("{root}/POLICIES.md")).unwrap();
    let scenarios = format!("{root}/scenarios");
    let suite = controller(&["evaluate", "--scenarios", &scenarios, "--rounds", "300", "--interval", "2s"]);
    assert!(suite.status.success(), "{}", text(&suite.stderr));
    for row in text(&suite.stdout).lines().skip(2) {
        assert!(doc.lines().any(|l| l == row), "POLICIES.md lacks the suite row {row}");
    }

    // "Beyond the suite": the `guarded` and `converge now` columns, cells with the pin changes until balance.
    let dir = generated_hosts(root, "random-hosts");
    let d = dir.to_str().unwrap();
    let until = |c: &[String]| format!("{} / {} / {} / {}", c[2], c[3], c[6], c[7]);
    let evaluate = ["evaluate", "--scenarios", d, "--policy", "guarded,converge", "--rounds", "300", "--interval", "2s"];
    let checked = rows_match(&doc, &evaluate, until, |c| if c[1] == "guarded" { 2 } else { 5 });
    assert_eq!(checked, 48, "24 hosts, two policies");
    std::fs::remove_dir_all(&dir).unwrap();

    // "Multi-vCPU domains": the 12 hosts of scripts/random-mixed-hosts, `guarded` and `converge`.
    let dir = generated_hosts(root, "random-mixed-hosts");
    let d = dir.to_str().unwrap();
    let evaluate = ["evaluate", "--scenarios", d, "--policy", "guarded,converge", "--rounds", "300", "--interval", "2s"];
    let checked = rows_match(&doc, &evaluate, all_pins, |c| if c[1] == "guarded" { 1 } else { 2 });
    assert_eq!(checked, 24, "12 hosts, two policies");
    std::fs::remove_dir_all(&dir).unwrap();

    // "A limit on moves per round": converge with no limit and under --max-moves 1, 2 and 4.
    let section = doc.split("## A limit on moves per round").nth(1).expect("the --max-moves section");
    for (col, limit) in [(1, None), (2, Some("1")), (3, Some("2")), (4, Some("4"))] {
        let mut args = vec!["evaluate", "--scenarios", &scenarios, "--policy", "converge", "--rounds", "300", "--interval", "2s"];
        args.extend(limit.iter().flat_map(|n| ["--max-moves", n]));
        assert_eq!(rows_match(section, &args, all_pins, |_| col), 12, "--max-moves {limit:?}");
    }
}

/// A table cell *balanced at round / pin changes in all / back-and-forth / final spread* from a row of `evaluate`.
fn all_pins(c: &[String]) -> String {
    let pins = c[3].parse::<u64>().unwrap() + c[4].parse::<u64>().unwrap();
    format!("{} / {pins} / {} / {}", c[2], c[6], c[7])
}

/// The hosts `scripts/NAME` writes, in a fresh temporary directory.
fn generated_hosts(root: &str, name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("vcpub-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let gen = Command::new(format!("{root}/scripts/{name}")).arg(&dir).output().expect("run the script");
    assert!(gen.status.success(), "{}", text(&gen.stderr));
    dir
}

/// Runs the controller with `args` (an `evaluate`) and checks every row it prints against the row of `doc` that
/// starts with the same scenario: its column `col(row)` must read `cell(row)`. Returns the rows checked.
fn rows_match(doc: &str, args: &[&str], cell: impl Fn(&[String]) -> String, col: impl Fn(&[String]) -> usize) -> usize {
    let out = controller(args);
    assert!(out.status.success(), "{args:?}: {}", text(&out.stderr));
    let mut checked = 0;
    for row in text(&out.stdout).lines().skip(2) {
        let c = cells(row);
        let line = doc.lines().find(|l| l.starts_with(&format!("| {} |", c[0])));
        let want = cells(line.unwrap_or_else(|| panic!("POLICIES.md has no row for {} ({args:?})", c[0])));
        assert_eq!(want[col(&c)], cell(&c), "POLICIES.md, {} with {} ({args:?})", c[0], c[1]);
        checked += 1;
    }
    checked
}

/// `--no-guard` is `--policy seed`: on all-on-one both move exactly one vCPU in the first computed round.
#[test]
fn no_guard_is_an_alias_of_seed_and_policy_is_selectable() {
    for extra in [&["--no-guard"][..], &["--policy", "seed"][..], &["--policy", "guarded"][..]] {
        let agent = Agent::start("all-on-one");
        let mut args = vec!["run", "--host", agent.addr.as_str(), "--rounds", "2", "--interval", "200ms", "--json"];
        args.extend_from_slice(extra);
        let out = controller(&args);
        assert!(out.status.success(), "{extra:?}: {}", text(&out.stderr));
        let last: serde_json::Value = serde_json::from_str(text(&out.stdout).lines().last().unwrap()).unwrap();
        assert_eq!(last["moves"].as_array().unwrap().len(), 1, "{extra:?}: {last}");
    }
}

/// Switches set in the environment take what `/etc/default` files write (`VCPU_DRY_RUN=1`, as README shows), and
/// a value that is neither on nor off is refused rather than guessed.
#[test]
fn switches_from_the_environment_read_like_unit_files() {
    let agent = Agent::start("all-on-one");
    for (value, dry) in [("1", true), ("yes", true), ("on", true), ("0", false), ("no", false), ("", false)] {
        let out = Command::new(CONTROLLER)
            .args(["run", "--host", agent.addr.as_str(), "--rounds", "1", "--interval", "100ms", "--json"])
            .env("VCPU_DRY_RUN", value)
            .output()
            .unwrap();
        assert!(out.status.success(), "VCPU_DRY_RUN={value:?}: {}", text(&out.stderr));
        let last: serde_json::Value = serde_json::from_str(text(&out.stdout).lines().last().unwrap()).unwrap();
        assert_eq!(last["dry_run"], serde_json::json!(dry), "VCPU_DRY_RUN={value:?}: {last}");
    }
    let out = Command::new(CONTROLLER)
        .args(["run", "--host", agent.addr.as_str(), "--rounds", "1"])
        .env("VCPU_DRY_RUN", "maybe")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "VCPU_DRY_RUN=maybe accepted");
    assert!(text(&out.stderr).contains("is not on or off"), "{}", text(&out.stderr));
    let out = Command::new(AGENT)
        .args(["--backend", "sim", "--listen", "0.0.0.0:0", "--scenario", "no-such"])
        .env("VCPU_AGENT_INSECURE", "1")
        .output()
        .unwrap();
    let err = text(&out.stderr);
    assert!(err.contains("not a built-in scenario"), "VCPU_AGENT_INSECURE=1 not read as on: {err}");
}

/// Plaintext off loopback is refused with the reason; `--insecure` serves anyway.
#[test]
fn agent_refuses_plaintext_off_loopback() {
    let out = Command::new(AGENT).args(["--backend", "sim", "--listen", "0.0.0.0:0"]).output().unwrap();
    assert_eq!(out.status.code(), Some(64), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(err.contains("refusing to serve plaintext") && err.contains("--insecure") && err.contains("--tls-cert"), "{err}");
    let out = Command::new(AGENT).args(["--backend", "sim", "--listen", "127.0.0.1:0", "--tls-cert", "x.crt"]).output().unwrap();
    assert!(text(&out.stderr).contains("--tls-key, --tls-ca"), "half a TLS config is refused: {}", text(&out.stderr));
    let agent = common::AgentProcess::start_on("0.0.0.0:0", &["--backend", "sim", "--insecure"]);
    let port = agent.addr.rsplit(':').next().unwrap();
    let local = format!("127.0.0.1:{port}");
    let show = controller(&["show", "--host", &local, "--window", "200ms"]);
    assert!(show.status.success(), "{}", text(&show.stderr));
}

/// Two minutes to a secure fleet: `certs`, an agent with TLS, the controller pins; a reader is refused with 69.
#[test]
fn certs_then_mutual_tls_end_to_end() {
    let dir = std::env::temp_dir().join(format!("vcpu-cli-certs-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let d = dir.to_str().unwrap();
    let out = controller(&["certs", "--out", d, "--host", "127.0.0.1", "--reader", "monitor"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("agent-127.0.0.1.crt"), "{}", text(&out.stdout));
    let again = controller(&["certs", "--out", d, "--host", "127.0.0.1"]);
    assert!(!again.status.success() && text(&again.stderr).contains("refusing to overwrite"), "{}", text(&again.stderr));

    let f = |n: &str| dir.join(n).to_str().unwrap().to_string();
    let (cert, key, ca) = (f("agent-127.0.0.1.crt"), f("agent-127.0.0.1.key"), f("ca.crt"));
    let agent = common::AgentProcess::start(&[
        "--backend", "sim", "--scenario", "balanced", "--tls-cert", &cert, "--tls-key", &key, "--tls-ca", &ca,
    ]);
    let tls = |who: &str| vec!["--tls-cert".to_string(), f(&format!("{who}.crt")), "--tls-key".into(), f(&format!("{who}.key")), "--tls-ca".into(), f("ca.crt")];
    let pin = |who: &str, pcpu: &str| {
        let mut a: Vec<String> = ["pin", "--host", &agent.addr, "--domain", "vm1", "--vcpu", "0", "--pcpu", pcpu].iter().map(|s| s.to_string()).collect();
        a.extend(tls(who));
        Command::new(CONTROLLER).args(&a).output().unwrap()
    };
    let ok = pin("controller", "2");
    assert!(ok.status.success(), "{}", text(&ok.stderr));
    let refused = pin("reader-monitor", "3");
    assert_eq!(refused.status.code(), Some(69));
    assert!(text(&refused.stderr).contains("PermissionDenied"), "{}", text(&refused.stderr));
    let plain = controller(&["pin", "--host", &agent.addr, "--domain", "vm1", "--vcpu", "0", "--pcpu", "3", "--rpc-timeout", "2s"]);
    assert!(!plain.status.success(), "plaintext pinned on a TLS agent");
    // Only the controller's pin took effect.
    let mut show: Vec<String> = ["show", "--host", &agent.addr, "--window", "200ms"].iter().map(|s| s.to_string()).collect();
    show.extend(tls("reader-monitor"));
    let s = Command::new(CONTROLLER).args(&show).output().unwrap();
    assert!(s.status.success(), "a reader may show: {}", text(&s.stderr));
    let table = text(&s.stdout);
    assert!(table.lines().find(|l| l.contains("pCPU   2")).unwrap().contains("vm1/0"), "{table}");
    // `run` over TLS: samples and decides like over plaintext.
    let mut run: Vec<String> = ["run", "--host", &agent.addr, "--rounds", "2", "--interval", "200ms", "--json"].iter().map(|s| s.to_string()).collect();
    run.extend(tls("controller"));
    let r = Command::new(CONTROLLER).args(&run).output().unwrap();
    assert!(r.status.success(), "{}", text(&r.stderr));
    let rounds: Vec<serde_json::Value> = text(&r.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(rounds.len(), 2);
    assert_ne!(rounds[1]["action"]["type"], "error", "{}", text(&r.stdout));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Two controllers on one `--state-dir` would each take the other's pins for an operator's: the second is refused
/// while the first runs (a dry run, which writes nothing there, is not), and the directory is free once it stops.
#[test]
fn a_state_dir_is_used_by_one_controller_at_a_time() {
    let dir = std::env::temp_dir().join(format!("vcpu-cli-lock-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let d = dir.to_str().unwrap();
    let base = ["run", "--host", "127.0.0.1:1", "--interval", "1s", "--rpc-timeout", "200ms", "--state-dir", d];
    let mut first = Command::new(CONTROLLER).args(base).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null()).spawn().unwrap();
    let refused = |extra: &[&str]| {
        let out = controller(&[&base[..], &["--rounds", "1"], extra].concat());
        text(&out.stderr).contains("another controller uses this state directory")
    };
    // Wait until the first holds the lock, as /proc/locks shows it: probing by locking from here, or starting a
    // second controller too early, could take the lock first and make the first one exit.
    let first_pid = first.id().to_string();
    let held_by_first = || {
        use std::os::unix::fs::MetadataExt;
        let Ok(ino) = std::fs::metadata(dir.join(".lock")).map(|m| m.ino()) else { return false };
        let locks = std::fs::read_to_string("/proc/locks").unwrap_or_default();
        locks.lines().any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 5 && f[1] == "FLOCK" && f[4] == first_pid && f[5].rsplit(':').next() == Some(&ino.to_string())
        })
    };
    let mut held = false;
    for _ in 0..600 {
        if held_by_first() {
            held = true;
            break;
        }
        assert!(first.try_wait().unwrap().is_none(), "the first controller exited");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(held, "the first controller never took the lock");
    assert!(refused(&[]), "a second controller was not refused");
    assert!(!refused(&["--dry-run"]), "a dry run is refused");
    first.kill().unwrap();
    first.wait().unwrap();
    assert!(!refused(&[]), "the directory stayed locked after the first controller stopped");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `--json` into a pipe nobody reads: the balancing goes on, round after round, and the controller says that it
/// drops reports. Before, the printer blocked on the full pipe, the report channels filled behind it, and every host
/// stopped after a few dozen rounds. The host has 200 vCPUs, so a report is tens of kB and the pipe (64 KiB by
/// default) is full after a few rounds.
#[test]
fn a_json_output_nobody_reads_does_not_stop_the_balancing() {
    use std::io::{BufRead, BufReader};
    let scenario = concat!(env!("CARGO_MANIFEST_DIR"), "/scenarios/random-64x200.toml");
    let agent = Agent::start(scenario);
    let mut ctl = Command::new(CONTROLLER)
        .args(["run", "--host", &agent.addr, "--interval", "50ms", "--json"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Held, never read.
    let _stdout = ctl.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let stderr = ctl.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let round_of = |line: &str| -> Option<u64> {
        let i = line.find(" round=")?;
        line[i + 7..].split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
    };
    let (mut last_round, mut warned) = (0, false);
    // 200 rounds of 200 vCPUs are megabytes of JSON: far more than the pipe and the controller's queues hold.
    while last_round < 200 || !warned {
        // A guard against a hang, not a timing: at 50 ms a round, 200 rounds take ten seconds.
        let line = match rx.recv_timeout(std::time::Duration::from_secs(60)) {
            Ok(line) => line,
            Err(e) => {
                let _ = ctl.kill();
                panic!("{e:?} after round {last_round} (warned: {warned}): the balancing stopped");
            }
        };
        warned |= line.contains("--json output is not being read");
        if let Some(r) = round_of(&line) {
            last_round = last_round.max(r);
        }
    }
    ctl.kill().unwrap();
    ctl.wait().unwrap();
}
