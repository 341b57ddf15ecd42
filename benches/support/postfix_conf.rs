//! Configuration of a loopback-only Postfix instance (own config, queue and data directories,
//! nothing chrooted), shared by the relay benchmark and the e2e tests.

use std::path::Path;

/// The `main.cf` lines every loopback instance needs: its directories under `dir`, loopback
/// only, no local delivery, no DNS, its log in `dir/postfix.log`. The caller appends its own.
pub fn base_main_cf(dir: &Path, hostname: &str) -> String {
    format!(
        "compatibility_level = 3.6
queue_directory = {dir}/queue
data_directory = {dir}/data
command_directory = /usr/sbin
daemon_directory = /usr/lib/postfix/sbin
meta_directory = /etc/postfix
shlib_directory = /usr/lib/postfix
mail_owner = postfix
setgid_group = postdrop
myhostname = {hostname}
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mydestination =
local_recipient_maps =
alias_maps =
alias_database =
smtp_dns_support_level = disabled
mynetworks = 127.0.0.0/8
maillog_file_prefixes = {dir}
maillog_file = {dir}/postfix.log
biff = no
",
        dir = dir.display(),
    )
}

/// Debian's `master.cf`, unchrooted, with smtpd on `127.0.0.1:port`.
pub fn master_cf(port: u16) -> Result<String, String> {
    let master = std::fs::read_to_string("/etc/postfix/master.cf").map_err(|e| {
        format!("/etc/postfix/master.cf (scripts/install-deps.sh installs postfix): {e}")
    })?;
    let mut out = String::new();
    for line in master.lines() {
        if line.starts_with('#') || line.starts_with([' ', '\t']) || line.trim().is_empty() {
            out.push_str(line);
            out.push('\n');
            continue;
        }
        let mut fields: Vec<String> = line.split_whitespace().map(str::to_owned).collect();
        if fields.len() >= 8 {
            if fields[0] == "smtp" && fields[1] == "inet" {
                fields[0] = format!("127.0.0.1:{port}");
            }
            fields[4] = "n".into();
        }
        out.push_str(&fields.join(" "));
        out.push('\n');
    }
    Ok(out)
}
