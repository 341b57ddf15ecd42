//! The rules a reload (SIGHUP) replaces while the engine runs.

use crate::automation::Automation;
use crate::config::{Config, ConfigError, ShapingConfig};

/// Rules that can change while the engine runs.
#[derive(Debug)]
pub(crate) struct Policy {
    pub(crate) automation: Automation,
    /// `[[dkim]]` keys: reloaded with the rest, so a key rotation needs no restart.
    pub(crate) signers: dkim::Signers,
    shaping: Vec<ShapingConfig>,
}

impl Policy {
    pub(crate) fn from_config(config: &Config) -> Result<Policy, ConfigError> {
        Ok(Policy {
            automation: Automation::from_config(config),
            signers: config.dkim_signers()?,
            shaping: config.shaping.clone(),
        })
    }

    /// STARTTLS mode of a destination.
    pub(crate) fn tls_mode(&self, domain: &str, mx_hosts: &[String]) -> connection_pool::TlsMode {
        crate::config::tls_mode_of(&self.shaping, domain, mx_hosts)
    }
}
