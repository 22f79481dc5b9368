//! A service binary as a child process, the one way the tests start one: its config file,
//! the pipeline config beside it (`pipeline.toml`, through `S2S_PIPELINE`), JSON logs
//! appended to a file the tests read events from, SIGKILL to crash it.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use serde_json::Value;
use tokio::process::{Child, Command};

/// What the children log: warnings, plus partition ownership and ingest's start.
const RUST_LOG: &str = "warn,s2s_ingest=info,s2s_state::ownership=info";

#[derive(Debug)]
pub struct ChildService {
    bin: &'static str,
    config: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    /// How many times it was started.
    pub starts: usize,
    /// Set: the environment variable that gives each start a consumer group of its own.
    group_per_start: Option<String>,
    /// More environment for each start (over the defaults, `RUST_LOG` too).
    env: Vec<(String, String)>,
}

impl ChildService {
    /// `bin` with `config`; logs to `config` with the extension `.log`.
    pub fn new(bin: &'static str, config: PathBuf) -> Self {
        let log = config.with_extension("log");
        ChildService {
            bin,
            config,
            log,
            child: None,
            starts: 0,
            group_per_start: None,
            env: Vec::new(),
        }
    }

    /// Starts it with `name=value` in its environment too.
    pub fn with_env(mut self, name: &str, value: &str) -> Self {
        self.env.push((name.to_string(), value.to_string()));
        self
    }

    /// Every start joins a new consumer group, through `S2S_<SERVICE>__GROUP_ID`
    /// (`service` as in `delivery`), for a single instance restarted after SIGKILL: Tansu
    /// 0.6.0 can leave a group without an assignment for minutes after its only member
    /// died (its group bug, `test-broker.md`), while a crashed member's successor in a
    /// working group gets the partitions after the session timeout. The service's store,
    /// not the group's committed offsets, decides where reading starts, so what the
    /// restart reads again is the same either way.
    pub fn group_per_start(mut self, service: &str) -> Self {
        self.group_per_start = Some(format!("S2S_{}__GROUP_ID", service.to_ascii_uppercase()));
        self
    }

    /// Logs to `log` instead.
    pub fn with_log(mut self, log: PathBuf) -> Self {
        self.log = log;
        self
    }

    /// The command that runs `bin` with `config` and its pipeline config, logging JSON:
    /// for one-off runs of a subcommand (add its arguments).
    pub fn command(bin: &'static str, config: &Path) -> Command {
        let mut cmd = Command::new(bin);
        cmd.arg("--config")
            .arg(config)
            .env("S2S_PIPELINE", config.with_file_name("pipeline.toml"))
            .env("RUST_LOG", RUST_LOG)
            .env("S2S_LOG_FORMAT", "json")
            .kill_on_drop(true);
        cmd
    }

    /// Starts it, appending its output to the log.
    pub fn start(&mut self) {
        self.starts += 1;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let mut cmd = Self::command(self.bin, &self.config);
        if let Some(var) = &self.group_per_start {
            cmd.env(var, crate::unique("group"));
        }
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        let child = cmd
            .stdout(Stdio::from(log.try_clone().expect("log")))
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", self.bin));
        self.child = Some(child);
    }

    /// SIGKILL, and wait for it to be gone.
    pub async fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.start_kill().expect("SIGKILL");
            c.wait().await.expect("reaped");
        }
    }

    /// The log events with `message`, as their fields.
    pub fn events(&self, message: &str) -> Vec<Value> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v["fields"]["message"] == message)
            .map(|v| v["fields"].clone())
            .collect()
    }

    pub fn log(&self) -> &Path {
        &self.log
    }
}
