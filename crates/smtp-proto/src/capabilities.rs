use crate::reply::Reply;

/// The ESMTP extensions a server advertised in its EHLO reply (or, for a
/// server, the ones it will advertise).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// PIPELINING (RFC 2920).
    pub pipelining: bool,
    /// SIZE (RFC 1870): `Some(0)` means "SIZE without a fixed limit".
    pub size: Option<u64>,
    /// 8BITMIME (RFC 6152).
    pub eight_bit_mime: bool,
    /// SMTPUTF8 (RFC 6531).
    pub smtputf8: bool,
    /// STARTTLS (RFC 3207).
    pub starttls: bool,
    /// CHUNKING / BDAT (RFC 3030).
    pub chunking: bool,
    /// ENHANCEDSTATUSCODES (RFC 2034).
    pub enhanced_status_codes: bool,
    /// DSN (RFC 3461).
    pub dsn: bool,
    /// SASL mechanisms from AUTH, upper-cased, without duplicates.
    pub auth: Vec<String>,
    /// Every other extension line, verbatim.
    pub other: Vec<String>,
}

impl Capabilities {
    /// Reads the extensions from an EHLO reply.
    ///
    /// The first line is the server's greeting name and is skipped. Keywords
    /// are case-insensitive; `SIZE` without a number gives `Some(0)`; the
    /// legacy `AUTH=LOGIN PLAIN` form is accepted alongside `AUTH LOGIN PLAIN`.
    pub fn from_ehlo(reply: &Reply) -> Capabilities {
        let mut caps = Capabilities::default();
        for line in reply.lines.iter().skip(1) {
            let line = line.trim();
            let mut words = line.split_ascii_whitespace();
            let Some(keyword) = words.next() else {
                continue;
            };
            let upper = keyword.to_ascii_uppercase();
            match upper.as_str() {
                "PIPELINING" => caps.pipelining = true,
                "8BITMIME" => caps.eight_bit_mime = true,
                "SMTPUTF8" => caps.smtputf8 = true,
                "STARTTLS" => caps.starttls = true,
                "CHUNKING" => caps.chunking = true,
                "ENHANCEDSTATUSCODES" => caps.enhanced_status_codes = true,
                "DSN" => caps.dsn = true,
                "SIZE" => {
                    // An unparsable limit is treated like no limit rather than
                    // refusing to talk to the server.
                    caps.size = Some(words.next().and_then(|n| n.parse().ok()).unwrap_or(0));
                }
                "AUTH" => caps.add_auth(words),
                _ if upper.starts_with("AUTH=") => {
                    let first = &keyword["AUTH=".len()..];
                    caps.add_auth(std::iter::once(first).chain(words));
                }
                _ => caps.other.push(line.to_string()),
            }
        }
        caps
    }

    fn add_auth<'a>(&mut self, mechanisms: impl Iterator<Item = &'a str>) {
        for m in mechanisms {
            let m = m.to_ascii_uppercase();
            if !m.is_empty() && !self.auth.contains(&m) {
                self.auth.push(m);
            }
        }
    }

    /// The extension lines a server puts after its greeting line in the EHLO
    /// reply, e.g. `["PIPELINING", "SIZE 1000", "8BITMIME"]`.
    pub fn to_ehlo_lines(&self) -> Vec<String> {
        let mut lines = Vec::new();
        if self.pipelining {
            lines.push("PIPELINING".to_string());
        }
        match self.size {
            Some(0) => lines.push("SIZE".to_string()),
            Some(n) => lines.push(format!("SIZE {n}")),
            None => {}
        }
        let flags = [
            (self.eight_bit_mime, "8BITMIME"),
            (self.smtputf8, "SMTPUTF8"),
            (self.starttls, "STARTTLS"),
            (self.chunking, "CHUNKING"),
            (self.enhanced_status_codes, "ENHANCEDSTATUSCODES"),
            (self.dsn, "DSN"),
        ];
        lines.extend(
            flags
                .iter()
                .filter(|(on, _)| *on)
                .map(|(_, k)| k.to_string()),
        );
        if !self.auth.is_empty() {
            lines.push(format!("AUTH {}", self.auth.join(" ")));
        }
        lines.extend(self.other.iter().cloned());
        lines
    }
}
