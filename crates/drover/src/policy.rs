//! The rules a reload (SIGHUP) replaces while the engine runs.

use crate::automation::Automation;
use crate::config::{Config, ConfigError, ShapingConfig};
use crate::stamping::Stamper;

/// Rules that can change while the engine runs.
#[derive(Debug)]
pub(crate) struct Policy {
    pub(crate) automation: Automation,
    /// `[[dkim]]` keys: reloaded with the rest, so a key rotation needs no restart.
    pub(crate) signers: dkim::Signers,
    shaping: Vec<ShapingConfig>,
    /// `[stamping]` and VERP: reloaded too, so a new complaint address needs no restart.
    pub(crate) stamper: Stamper,
}

impl Policy {
    pub(crate) fn from_config(config: &Config) -> Result<Policy, ConfigError> {
        Ok(Policy {
            automation: Automation::from_config(config),
            signers: config.dkim_signers()?,
            shaping: config.shaping.clone(),
            stamper: Stamper::from_config(config),
        })
    }

    /// STARTTLS mode of a destination.
    pub(crate) fn tls_mode(&self, domain: &str, mx_hosts: &[String]) -> connection_pool::TlsMode {
        crate::config::tls_mode_of(&self.shaping, domain, mx_hosts)
    }
}
