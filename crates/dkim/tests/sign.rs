//! Signing with RSA and Ed25519 keys from PEM fixtures, verified by mail-auth's verifier
//! against the keys' own records (no DNS).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    missing_docs,
    unreachable_pub
)]

use dkim::testing::{verify, Verdict};
use dkim::{DkimError, KeyConfig, Signers};
use std::path::PathBuf;

/// This crate's directory, as cargo gives it to the running test: a compile-time path can
/// name another checkout when a target directory is shared between clones.
fn manifest_dir() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

fn fixture(name: &str) -> PathBuf {
    manifest_dir().join("tests/fixtures").join(name)
}

fn key(domain: &str, selector: &str, file: &str) -> KeyConfig {
    KeyConfig {
        domain: domain.into(),
        selector: selector.into(),
        key_file: fixture(file),
    }
}

const MESSAGE: &str = "Received: from a by b; Tue, 1 Dec 2026 10:00:00 +0000\r\n\
From: \"News, Weekly\" <News@Example.com>\r\n\
To: Ann <ann@example.test>\r\n\
Subject: Hello\r\n\x20Ann\r\n\
Date: Tue, 1 Dec 2026 10:00:00 +0000\r\n\
Message-ID: <abc@news.example.com>\r\n\
MIME-Version: 1.0\r\n\
Content-Type: text/plain; charset=utf-8\r\n\
List-Unsubscribe: <mailto:unsub@example.com>\r\n\
X-Campaign: nov-2026\r\n\
X-Other: not signed\r\n\
\r\n\
Hi Ann,  your plan   is gold.\r\n\
\r\n\
\r\n";

fn signature_tags(signed: &[u8]) -> String {
    let text = String::from_utf8_lossy(signed);
    let header = text.split("\r\n\r\n").next().unwrap();
    // Unfold the first DKIM-Signature field.
    let mut out = String::new();
    let mut inside = false;
    for line in header.split("\r\n") {
        if line.starts_with("DKIM-Signature:") {
            inside = true;
        } else if !line.starts_with([' ', '\t']) {
            inside = false;
        }
        if inside {
            out.push_str(line.trim_start());
        }
    }
    out.split_whitespace().collect()
}

fn tag<'a>(tags: &'a str, name: &str) -> &'a str {
    tags.split(';')
        .map(str::trim)
        .find_map(|t| t.strip_prefix(&format!("{name}=")))
        .unwrap_or_else(|| panic!("no {name}= in {tags}"))
}

#[tokio::test]
async fn rsa_and_ed25519_signatures_verify() {
    for (file, algorithm) in [
        ("rsa2048.pem", "rsa-sha256"),
        ("rsa2048-pkcs1.pem", "rsa-sha256"),
        ("ed25519.pem", "ed25519-sha256"),
    ] {
        let signers = Signers::load(&[key("example.com", "s1", file)]).unwrap();
        let signed = signers.sign(MESSAGE.as_bytes()).unwrap().expect("signed");
        assert!(signed.starts_with(b"DKIM-Signature: "));
        assert!(signed.ends_with(MESSAGE.as_bytes()), "message kept as is");
        let tags = signature_tags(&signed);
        assert_eq!(tag(&tags, "a"), algorithm, "{file}");
        assert_eq!(tag(&tags, "c"), "relaxed/relaxed");
        assert_eq!(tag(&tags, "d"), "example.com");
        assert_eq!(tag(&tags, "s"), "s1");
        let h: Vec<String> = tag(&tags, "h")
            .split(':')
            .map(|h| h.to_ascii_lowercase())
            .collect();
        for name in [
            "from",
            "to",
            "subject",
            "date",
            "message-id",
            "mime-version",
            "content-type",
            "list-unsubscribe",
            "x-campaign",
        ] {
            assert!(h.contains(&name.to_owned()), "{name} signed: {h:?}");
        }
        for name in ["received", "x-other", "cc", "reply-to", "list-id"] {
            assert!(!h.contains(&name.to_owned()), "{name} not signed: {h:?}");
        }
        assert_eq!(
            h.iter().filter(|n| *n == "from").count(),
            2,
            "From is oversigned: {h:?}"
        );
        let records = signers.dns_records();
        assert_eq!(records[0].0, "s1._domainkey.example.com");
        assert_eq!(
            verify(&signed, &records).await,
            vec![Verdict::Pass],
            "{file}: {}",
            String::from_utf8_lossy(&signed)
        );
    }
}

#[test]
fn dns_records_match_openssl_public_keys() {
    for (file, public, k) in [
        ("rsa2048.pem", "rsa2048.pub.b64", "rsa"),
        ("ed25519.pem", "ed25519.pub.b64", "ed25519"),
    ] {
        let signers = Signers::load(&[key("example.com", "s1", file)]).unwrap();
        let expected = std::fs::read_to_string(fixture(public)).unwrap();
        assert_eq!(
            signers.dns_records()[0].1,
            format!("v=DKIM1; k={k}; p={}", expected.trim())
        );
    }
}

#[tokio::test]
async fn tampering_breaks_the_signature() {
    let signers = Signers::load(&[key("example.com", "s1", "rsa2048.pem")]).unwrap();
    let records = signers.dns_records();
    let signed = String::from_utf8(signers.sign(MESSAGE.as_bytes()).unwrap().unwrap()).unwrap();

    let body = signed.replace("plan   is gold", "plan   is free");
    assert!(matches!(
        &verify(body.as_bytes(), &records).await[..],
        [Verdict::NotPass(_)]
    ));

    let subject = signed.replace("Subject: Hello", "Subject: Bye");
    assert!(matches!(
        &verify(subject.as_bytes(), &records).await[..],
        [Verdict::NotPass(_)]
    ));

    // A second From slipped in after signing: the oversigned From catches it.
    let second_from = signed.replace("To: Ann", "From: evil@attacker.test\r\nTo: Ann");
    assert!(matches!(
        &verify(second_from.as_bytes(), &records).await[..],
        [Verdict::NotPass(_)]
    ));

    // Relaxed canonicalization: whitespace changes inside lines and refolding still verify.
    let relaxed = signed
        .replace("plan   is gold", "plan is gold")
        .replace("Subject: Hello\r\n Ann", "Subject:   Hello Ann");
    assert_eq!(
        verify(relaxed.as_bytes(), &records).await,
        vec![Verdict::Pass]
    );
    // An unsigned header may be added.
    let added = signed.replace("X-Other:", "X-Added: yes\r\nX-Other:");
    assert_eq!(
        verify(added.as_bytes(), &records).await,
        vec![Verdict::Pass]
    );
}

#[tokio::test]
async fn the_most_specific_domain_signs() {
    let signers = Signers::load(&[
        key("example.com", "parent", "rsa2048.pem"),
        key("news.example.com", "child", "ed25519.pem"),
    ])
    .unwrap();
    let records = signers.dns_records();
    let sign = |from: &str| {
        let m = format!("From: {from}\r\nSubject: x\r\n\r\nbody\r\n");
        signers
            .sign(m.as_bytes())
            .unwrap()
            .map(|s| signature_tags(&s))
    };
    let child = sign("a@news.example.com").unwrap();
    assert_eq!(tag(&child, "d"), "news.example.com");
    assert_eq!(tag(&child, "s"), "child");
    let grandchild = sign("a@eu.news.example.com").unwrap();
    assert_eq!(tag(&grandchild, "d"), "news.example.com");
    let parent = sign("Shop <a@Shop.Example.COM.>").unwrap();
    assert_eq!(tag(&parent, "d"), "example.com");
    assert_eq!(tag(&parent, "s"), "parent");
    assert!(sign("a@example.com").is_some());
    // Unrelated domains, look-alikes and From without an address: not ours to sign.
    assert!(sign("a@example.org").is_none());
    assert!(sign("a@badexample.com").is_none());
    assert!(sign("a@example.com.evil.test").is_none());
    assert!(sign("undisclosed-recipients:;").is_none());
    assert!(signers
        .sign(b"Subject: no from\r\n\r\nbody\r\n")
        .unwrap()
        .is_none());

    // A subdomain's message signed with the parent's key verifies.
    let m = "From: a@shop.example.com\r\nTo: b@example.test\r\n\r\nbody\r\n";
    let signed = signers.sign(m.as_bytes()).unwrap().unwrap();
    assert_eq!(verify(&signed, &records).await, vec![Verdict::Pass]);
}

#[tokio::test]
async fn several_keys_for_one_domain_sign_twice() {
    let signers = Signers::load(&[
        key("example.com", "rsa", "rsa2048.pem"),
        key("example.com", "ed", "ed25519.pem"),
    ])
    .unwrap();
    let signed = signers.sign(MESSAGE.as_bytes()).unwrap().unwrap();
    assert_eq!(
        verify(&signed, &signers.dns_records()).await,
        vec![Verdict::Pass, Verdict::Pass]
    );
}

#[test]
fn malformed_messages_are_refused_when_a_key_applies() {
    let signers = Signers::load(&[key("example.com", "s1", "ed25519.pem")]).unwrap();
    let err = signers
        .sign(b"From: a@example.com\r\nFrom: b@other.test\r\n\r\nx\r\n")
        .unwrap_err();
    assert!(matches!(err, DkimError::Message(_)), "{err}");
    assert!(signers
        .sign(b"From: a@one.test\r\nFrom: b@other.test\r\n\r\nx\r\n")
        .unwrap()
        .is_none());
    // A body without the empty line before it: receivers would not agree on the headers.
    let err = signers
        .sign(b"From: a@example.com\r\nSubject: x\r\nHi Ann,\r\n")
        .unwrap_err();
    assert!(err.to_string().contains("Hi Ann,"), "{err}");
}

#[test]
fn lf_only_and_headers_only_messages_sign() {
    let signers = Signers::load(&[key("example.com", "s1", "ed25519.pem")]).unwrap();
    assert!(signers
        .sign(b"From: a@example.com\nSubject: x\n\nbody\n")
        .unwrap()
        .is_some());
    assert!(signers.sign(b"From: a@example.com\r\n").unwrap().is_some());
}

#[test]
fn bad_keys_name_their_entry() {
    let good = key("example.com", "s1", "ed25519.pem");
    let cases = [
        (key("example.com", "s1", "missing.pem"), "missing.pem"),
        (
            key("example.com", "s1", "README.md"),
            "not a PEM private key",
        ),
        (key("example.com", "s1", "ec-p256.pem"), "neither"),
        (key("example.com", "s1", "rsa512.pem"), "512 bits"),
        (key("example.com", "s1", "rsa2048.pub.b64"), "not a PEM"),
        (key("", "s1", "ed25519.pem"), "domain"),
        (key("example.com", "a b", "ed25519.pem"), "selector"),
    ];
    for (bad, needle) in cases {
        let err = Signers::load(&[good.clone(), bad]).unwrap_err();
        assert_eq!(err.entry_index(), Some(1), "{err}");
        assert!(err.to_string().contains(needle), "{needle}: {err}");
    }
}

#[test]
fn no_keys_sign_nothing() {
    let signers = Signers::load(&[]).unwrap();
    assert!(signers.is_empty());
    assert!(signers.sign(MESSAGE.as_bytes()).unwrap().is_none());
}
