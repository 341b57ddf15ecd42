//! A loopback-only Postfix relay (own config and queue directories, `relayhost` to the sink),
//! fed by `smtp-source`: the side-by-side with the MTA users know.

#[path = "../support/postfix_conf.rs"]
mod postfix_conf;

use crate::{free_port, smtp_source, wait_for_port, wait_until, which, Run, Sink};
use std::path::{Path, PathBuf};

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub struct Postfix {
    dir: PathBuf,
    port: u16,
}

fn run(cmd: &mut Command) -> Result<(), String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

impl Postfix {
    /// Writes `main.cf` / `master.cf` under the temp dir and starts the instance. (Not under
    /// `work`: Postfix daemons run as `postfix` and must reach their directories, which a
    /// target dir under /root does not allow.)
    pub fn start(_work: &Path, sink_port: u16) -> Result<Postfix, String> {
        let postfix = which("postfix").ok_or("postfix is not installed")?;
        let dir = std::env::temp_dir().join(format!("drover-bench-postfix-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (queue, data) = (dir.join("queue"), dir.join("data"));
        for d in [&dir, &queue, &data] {
            std::fs::create_dir_all(d).map_err(|e| format!("{}: {e}", d.display()))?;
        }
        run(Command::new("chown").arg("postfix").arg(&data))?;
        let port = free_port();
        let main = format!(
            "{}relay_domains =
relayhost = [127.0.0.1]:{sink_port}
smtpd_relay_restrictions = permit_mynetworks, reject
default_process_limit = 200
smtpd_client_connection_count_limit = 0
default_destination_concurrency_limit = 20
smtp_destination_concurrency_limit = 20
",
            postfix_conf::base_main_cf(&dir, "relay.bench.test")
        );
        std::fs::write(dir.join("main.cf"), main).map_err(|e| e.to_string())?;
        std::fs::write(dir.join("master.cf"), postfix_conf::master_cf(port)?)
            .map_err(|e| e.to_string())?;
        // Postfix logs start-up errors only to syslog; `script` gives them a terminal.
        run(Command::new("script")
            .arg("-qc")
            .arg(format!("{} -c {} start", postfix.display(), dir.display()))
            .arg("/dev/null"))?;
        if !wait_for_port(port, Duration::from_secs(15)) {
            let log = std::fs::read_to_string(dir.join("postfix.log")).unwrap_or_default();
            let _ = Command::new(&postfix)
                .arg("-c")
                .arg(&dir)
                .arg("stop")
                .output();
            return Err(format!("postfix did not listen on {port}: {log}"));
        }
        Ok(Postfix { dir, port })
    }

    /// `smtp-source -d -s 20 -m n -l size` into Postfix; done when the sink has them all.
    pub fn relay(&self, sink: &Sink, size: usize, n: u64) -> Result<Run, String> {
        let before = sink.count();
        let sink_cpu = sink.cpu();
        let start = Instant::now();
        smtp_source(self.port, size, n).map_err(|e| format!("into postfix: {e}"))?;
        let limit = Duration::from_secs(300);
        if !wait_until(limit, || sink.count() >= before + n) {
            return Err(format!(
                "postfix relayed {} of {n} within {limit:?}; see {}",
                sink.count() - before,
                self.dir.join("postfix.log").display()
            ));
        }
        let seconds = start.elapsed().as_secs_f64();
        Ok(Run {
            messages: n,
            seconds,
            rate: n as f64 / seconds,
            sink_cpu_share: (sink.cpu() - sink_cpu) / seconds,
            ..Run::default()
        })
    }
}

impl Drop for Postfix {
    fn drop(&mut self) {
        if let Some(postfix) = which("postfix") {
            let _ = Command::new(postfix)
                .arg("-c")
                .arg(&self.dir)
                .arg("stop")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
