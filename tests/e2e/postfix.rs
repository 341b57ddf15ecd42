//! The whole loop with a real MTA (issue 11): a loopback Postfix is the receiving MX; it accepts
//! a message for a recipient it then cannot deliver (a `transport_maps` entry `error:`), writes
//! its own DSN (RFC 3464) to the VERP envelope sender and delivers it to Drover's SMTP listener
//! (the bounce domain is routed there). Drover records an `AsyncBounce` for the right message and
//! recipient and suppresses the recipient, so the next injection refuses it.

#[path = "../../benches/support/postfix_conf.rs"]
mod postfix_conf;

use crate::harness::*;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

/// A loopback Postfix instance (own config and queue directories under /tmp: its daemons run
/// as `postfix` and must reach them), stopped on drop.
struct Postfix {
    dir: PathBuf,
}

fn run(cmd: &mut Command) {
    let out = cmd.stdin(Stdio::null()).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Postfix {
    /// A receiving MX on `port` for `example.test` that accepts everything, fails `gone@example.test`
    /// after accepting it, and sends mail for `bounces.example.net` to `drover_smtp`.
    fn start(port: u16, drover_smtp: std::net::SocketAddr) -> Postfix {
        let dir = std::env::temp_dir().join(format!(
            "drover-e2e-postfix-{}-{}",
            std::process::id(),
            free_port()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        let (queue, data) = (dir.join("queue"), dir.join("data"));
        for d in [&dir, &queue, &data] {
            std::fs::create_dir_all(d).unwrap();
        }
        run(Command::new("chmod").arg("755").arg(&dir));
        run(Command::new("chown").arg("postfix").arg(&data));
        std::fs::write(
            dir.join("transport"),
            format!(
                "gone@example.test error:5.1.1 Mailbox does not exist\n\
                 bounces.example.net smtp:[{}]:{}\n",
                drover_smtp.ip(),
                drover_smtp.port()
            ),
        )
        .unwrap();
        let main = format!(
            "{}relay_domains = example.test
relay_recipient_maps =
transport_maps = texthash:{dir}/transport
default_transport = error:this test instance sends nothing out
relay_transport = error:this test instance sends nothing out
smtpd_relay_restrictions = permit_mynetworks, permit_auth_destination, reject
# Accept at RCPT, bounce afterwards: smtpd would otherwise refuse a recipient whose
# transport is error:, and the test needs the DSN Postfix writes itself.
smtpd_reject_unlisted_recipient = no
delay_warning_time = 0
",
            postfix_conf::base_main_cf(&dir, "mx.postfix.test"),
            dir = dir.display(),
        );
        std::fs::write(dir.join("main.cf"), main).unwrap();
        std::fs::write(
            dir.join("master.cf"),
            postfix_conf::master_cf(port).unwrap(),
        )
        .unwrap();
        // Postfix reports start-up errors only to syslog; `script` gives them a terminal.
        run(Command::new("script")
            .arg("-qc")
            .arg(format!("postfix -c {} start", dir.display()))
            .arg("/dev/null"));
        let pf = Postfix { dir };
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "postfix did not listen: {}",
                pf.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        pf
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("postfix.log")).unwrap_or_default()
    }
}

impl Drop for Postfix {
    fn drop(&mut self) {
        let _ = Command::new("postfix")
            .arg("-c")
            .arg(&self.dir)
            .arg("stop")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postfix_bounces_to_the_verp_address_and_the_recipient_is_suppressed() {
    // Drover first: Postfix's transport map needs its SMTP port.
    let dir = tempfile::tempdir().unwrap();
    let pf_port = free_port();
    let engine = TestEngine::start_in(
        dir,
        &format!(
            "[smtp_listener]\nlisten = \"127.0.0.1:0\"\n\
             [[route]]\ndomain = \"example.test\"\nhosts = [\"127.0.0.1:{pf_port}\"]\n\
             [bounce_processing]\ndomains = [\"bounces.example.net\"]\nverp = true\n"
        ),
    )
    .await;
    let smtp = engine.running.as_ref().unwrap().smtp_addr.unwrap();
    let postfix = Postfix::start(pf_port, smtp);

    let (status, body) = engine
        .inject(&serde_json::json!({
            "envelope_sender": "news@sender.example.com",
            "content": "From: news@sender.example.com\r\nSubject: hello\r\n\r\nbody\r\n",
            "recipients": [{"email": "gone@example.test"}],
            "tenant": "acme",
            "campaign": "dec",
        }))
        .await;
    assert_eq!(status, 200, "{body}");
    let id = body["ids"][0].as_str().unwrap().to_owned();
    // Postfix accepts it (a Delivery), then bounces it to the VERP address: an AsyncBounce.
    let recs = wait_records(&engine.accounting_path(), Duration::from_secs(60), |r| {
        count_type(r, "AsyncBounce") >= 1
    })
    .await;
    let delivery = recs
        .iter()
        .find(|r| r["type"] == "Delivery")
        .expect("delivered to Postfix");
    assert_eq!(delivery["id"], id.as_str());
    let bounce = recs.iter().find(|r| r["type"] == "AsyncBounce").unwrap();
    assert_eq!(bounce["id"], id.as_str(), "{bounce}\n{}", postfix.log());
    assert_eq!(bounce["recipient"], "gone@example.test");
    assert_eq!(bounce["tenant"], "acme");
    assert_eq!(bounce["campaign"], "dec");
    assert_eq!(bounce["bounce_category"], "bad-mailbox", "{bounce}");
    assert_eq!(bounce["report"]["matched"], true);
    assert_eq!(bounce["report"]["reporting_mta"], "mx.postfix.test");
    // The next injection refuses the recipient.
    let (_, again) = engine
        .inject(&serde_json::json!({
            "envelope_sender": "news@sender.example.com",
            "content": "From: news@sender.example.com\r\nSubject: again\r\n\r\nbody\r\n",
            "recipients": [{"email": "gone@example.test"}],
            "tenant": "acme",
        }))
        .await;
    assert_eq!(again["success_count"], 0, "{again}");
    assert!(
        again["errors"][0].as_str().unwrap().contains("suppressed"),
        "{again}"
    );
    engine.stop().await;
}
