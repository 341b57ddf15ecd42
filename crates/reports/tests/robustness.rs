//! `parse` never panics, whatever comes in: arbitrary bytes, and the fixtures cut short or
//! with bytes changed (the shapes a fuzzer would take a long time to find from nothing).

use proptest::prelude::*;

fn fixtures() -> Vec<Vec<u8>> {
    let dir = format!("{}/tests/fixtures", env!("CARGO_MANIFEST_DIR"));
    let mut paths: Vec<_> = std::fs::read_dir(dir)
        .expect("fixtures dir")
        .map(|e| e.expect("entry").path())
        .collect();
    paths.sort();
    paths
        .iter()
        .map(|p| std::fs::read(p).expect("fixture"))
        .collect()
}

/// Checks what must hold of any report, besides not panicking.
fn check(bytes: &[u8]) {
    let r = reports::parse(bytes);
    assert!(r.recipients.len() <= reports::MAX_RECIPIENTS);
    for rcpt in &r.recipients {
        if let Some(s) = &rcpt.status {
            let parts: Vec<&str> = s.split('.').collect();
            assert_eq!(parts.len(), 3, "{s}");
            assert!(matches!(parts[0], "2" | "4" | "5"), "{s}");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
        check(&bytes);
    }

    #[test]
    fn report_shaped_text(lines in proptest::collection::vec(
        prop_oneof![
            Just("Content-Type: multipart/report; report-type=delivery-status; boundary=b".to_string()),
            Just("--b".to_string()),
            Just("--b--".to_string()),
            Just("Content-Type: message/delivery-status".to_string()),
            Just("Content-Type: message/feedback-report".to_string()),
            Just("Content-Type: message/rfc822".to_string()),
            Just("Content-Type: text/rfc822-headers".to_string()),
            Just("Content-Transfer-Encoding: base64".to_string()),
            Just("Final-Recipient: rfc822; <a@example.com>".to_string()),
            Just("Action: failed".to_string()),
            Just("Status: 5.1.1".to_string()),
            Just("<x@example.org>:".to_string()),
            Just("550 5.1.1 no".to_string()),
            Just("--- Below this line is a copy of the message.".to_string()),
            Just(String::new()),
            Just(" folded".to_string()),
            "[ -~]{0,40}",
        ],
        0..80,
    ), crlf in any::<bool>()) {
        let sep = if crlf { "\r\n" } else { "\n" };
        check(lines.join(sep).as_bytes());
    }

    #[test]
    fn truncated_fixtures(which in any::<prop::sample::Index>(), cut in any::<prop::sample::Index>()) {
        let all = fixtures();
        let f = which.get(&all);
        check(&f[..cut.index(f.len() + 1)]);
    }

    #[test]
    fn fixtures_with_byte_flips(
        which in any::<prop::sample::Index>(),
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..16),
    ) {
        let all = fixtures();
        let mut f = which.get(&all).clone();
        for (at, byte) in flips {
            let i = at.index(f.len());
            f[i] = byte;
        }
        check(&f);
    }
}
