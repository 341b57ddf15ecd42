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
    /// Bounce classification (`bounce_processing.classification_rules`, or the built-in
    /// rules).
    pub(crate) classifier: accounting::Classifier,
}

impl Policy {
    pub(crate) fn from_config(config: &Config) -> Result<Policy, ConfigError> {
        Ok(Policy {
            automation: Automation::from_config(config),
            signers: config.dkim_signers()?,
            shaping: config.shaping.clone(),
            stamper: Stamper::from_config(config),
            classifier: classifier(config)?,
        })
    }

    /// STARTTLS mode of a destination.
    pub(crate) fn tls_mode(&self, domain: &str, mx_hosts: &[String]) -> connection_pool::TlsMode {
        crate::config::tls_mode_of(&self.shaping, domain, mx_hosts)
    }
}

fn classifier(config: &Config) -> Result<accounting::Classifier, ConfigError> {
    let Some(path) = &config.bounce_processing.classification_rules else {
        return Ok(accounting::Classifier::default());
    };
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Invalid {
        key: "bounce_processing.classification_rules".into(),
        message: format!("{}: {e}", path.display()),
    })?;
    accounting::Classifier::from_toml(&text).map_err(|e| ConfigError::Invalid {
        key: "bounce_processing.classification_rules".into(),
        message: format!("{}: {e}", path.display()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use accounting::{BounceCategory, ReplyFacts};

    fn facts(text: &str) -> ReplyFacts<'_> {
        ReplyFacts {
            code: 550,
            enhanced: Some("5.1.1"),
            text,
            domain: Some("example.test"),
            mx_hosts: &[],
        }
    }

    #[test]
    fn a_rule_file_replaces_the_built_in_rules_and_a_bad_one_is_named() {
        let builtin = Policy::from_config(&Config::default()).unwrap();
        assert_eq!(
            builtin.classifier.classify(&facts("User unknown")),
            BounceCategory::BadMailbox
        );
        let dir = tempfile::tempdir().unwrap();
        let rules = dir.path().join("rules.toml");
        std::fs::write(
            &rules,
            "[[rule]]\ncategory = \"policy-related\"\ntext = \"(?i)user unknown\"\n",
        )
        .unwrap();
        let mut config = Config::default();
        config.bounce_processing.classification_rules = Some(rules.clone());
        let custom = Policy::from_config(&config).unwrap();
        assert_eq!(
            custom.classifier.classify(&facts("User unknown")),
            BounceCategory::PolicyRelated
        );
        std::fs::write(&rules, "[[rule]]\ncategory = \"no-such-category\"\n").unwrap();
        let err = Policy::from_config(&config).unwrap_err().to_string();
        assert!(
            err.contains("bounce_processing.classification_rules"),
            "{err}"
        );
        assert!(err.contains("no-such-category"), "{err}");
    }
}
