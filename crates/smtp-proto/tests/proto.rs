//! Table-driven and property tests for the smtp-proto wire grammar.

// Helpers outside #[test] functions are not covered by clippy.toml's
// allow-unwrap-in-tests; a panic is the right failure in a test binary.
#![allow(clippy::unwrap_used)]

use smtp_proto::{
    enhanced, parse_reply, take_line, validate_mailbox, Capabilities, Command, CommandError,
    DataReceiver, DotStuffer, EnhancedCode, ProtoError, Reply, ReplyLimits, ReplyScanner,
    MAX_COMMAND_LINE, MAX_REPLY_BYTES, MAX_REPLY_LINE, MAX_REPLY_LINES,
};

fn parse_all(input: &[u8]) -> (Reply, usize) {
    parse_reply(input, MAX_REPLY_LINE)
        .expect("parse ok")
        .expect("complete")
}

// ---------------------------------------------------------------- replies

#[test]
fn replies_parse() {
    struct Case {
        input: &'static [u8],
        code: u16,
        enhanced: Option<EnhancedCode>,
        lines: &'static [&'static str],
        text: &'static str,
    }
    let cases = [
        Case {
            input: b"220 mx.example ESMTP\r\n",
            code: 220,
            enhanced: None,
            lines: &["mx.example ESMTP"],
            text: "mx.example ESMTP",
        },
        Case {
            input: b"250 2.1.0 Sender OK\r\n",
            code: 250,
            enhanced: enhanced(2, 1, 0),
            lines: &["2.1.0 Sender OK"],
            text: "Sender OK",
        },
        Case {
            input: b"550-5.1.1 The email account\r\n550-5.1.1 does not\r\n550 5.1.1 exist\r\n",
            code: 550,
            enhanced: enhanced(5, 1, 1),
            lines: &["5.1.1 The email account", "5.1.1 does not", "5.1.1 exist"],
            text: "The email account does not exist",
        },
        Case {
            input: b"250-mx.example\r\n250-PIPELINING\r\n250 SIZE 100\r\n",
            code: 250,
            enhanced: None,
            lines: &["mx.example", "PIPELINING", "SIZE 100"],
            text: "mx.example PIPELINING SIZE 100",
        },
        Case {
            input: b"250\r\n",
            code: 250,
            enhanced: None,
            lines: &[""],
            text: "",
        },
        Case {
            input: b"250 ok\n",
            code: 250,
            enhanced: None,
            lines: &["ok"],
            text: "ok",
        },
        Case {
            input: b"421-a\n421 b\r\n",
            code: 421,
            enhanced: None,
            lines: &["a", "b"],
            text: "a b",
        },
        // Class digit must match the reply code to count as an enhanced code.
        Case {
            input: b"550 4.1.1 odd\r\n",
            code: 550,
            enhanced: None,
            lines: &["4.1.1 odd"],
            text: "4.1.1 odd",
        },
        Case {
            input: b"451 4.3.0\r\n",
            code: 451,
            enhanced: enhanced(4, 3, 0),
            lines: &["4.3.0"],
            text: "",
        },
        Case {
            input: b"354 Start mail input\r\n",
            code: 354,
            enhanced: None,
            lines: &["Start mail input"],
            text: "Start mail input",
        },
    ];
    for c in cases {
        let (reply, used) = parse_all(c.input);
        assert_eq!(used, c.input.len(), "{:?}", c.input);
        assert_eq!(reply.code, c.code);
        assert_eq!(reply.enhanced, c.enhanced, "{:?}", c.input);
        assert_eq!(reply.lines, c.lines);
        assert_eq!(reply.text(), c.text);
    }
}

#[test]
fn reply_leaves_pipelined_bytes() {
    let input = b"250 ok\r\n250 2.1.5 rcpt\r\n354 go";
    let (first, used) = parse_all(input);
    assert_eq!(first.code, 250);
    assert_eq!(used, 8);
    let (second, used2) = parse_all(&input[used..]);
    assert_eq!(second.enhanced, enhanced(2, 1, 5));
    assert!(parse_reply(&input[used + used2..], MAX_REPLY_LINE)
        .unwrap()
        .is_none());
}

#[test]
fn reply_split_at_every_position() {
    let inputs: &[&[u8]] = &[
        b"250-mx.example\r\n250-PIPELINING\r\n250-SIZE 100\r\n250 8BITMIME\r\n",
        b"550 5.1.1 No such user\r\n",
        b"250\r\n",
        b"221 bye\n",
    ];
    for input in inputs {
        for cut in 0..input.len() {
            assert!(
                parse_reply(&input[..cut], MAX_REPLY_LINE)
                    .unwrap()
                    .is_none(),
                "prefix {cut} of {input:?} parsed as complete"
            );
        }
        let (_, used) = parse_all(input);
        assert_eq!(used, input.len());
    }
}

#[test]
fn replies_rejected() {
    let cases: &[&[u8]] = &[
        b"25 short\r\n",
        b"abc nope\r\n",
        b"650 out of range\r\n",
        b"150 out of range\r\n",
        b"099 out of range\r\n",
        b"250x bad separator\r\n",
        b"\r\n",
        b"250-first\r\n251 different code\r\n",
        b"250-first\r\n550-different code\r\n550 end\r\n",
        b"HTTP/1.1 400 Bad Request\r\n",
    ];
    for input in cases {
        let res = parse_reply(input, MAX_REPLY_LINE);
        assert!(
            matches!(res, Err(ProtoError::BadReply(_))),
            "{input:?} gave {res:?}"
        );
    }
}

#[test]
fn reply_line_too_long() {
    let mut long = b"250 ".to_vec();
    long.extend(std::iter::repeat_n(b'x', 100));
    // Unterminated but already over the limit: fail early, don't wait.
    assert!(matches!(
        parse_reply(&long, 50),
        Err(ProtoError::LineTooLong { limit: 50 })
    ));
    long.extend_from_slice(b"\r\n");
    assert!(matches!(
        parse_reply(&long, 50),
        Err(ProtoError::LineTooLong { limit: 50 })
    ));
    // Exactly at the limit is fine, even while the CRLF is still arriving.
    let exact = b"250 12345\r\n";
    assert!(parse_reply(&exact[..10], 9).unwrap().is_none());
    assert!(parse_reply(exact, 9).unwrap().is_some());
    assert!(parse_reply(exact, 8).is_err());
    // A long second line of a multi-line reply.
    let mut multi = b"250-ok\r\n250 ".to_vec();
    multi.extend(std::iter::repeat_n(b'y', 60));
    assert!(parse_reply(&multi, 50).is_err());
}

// ------------------------------------------- resumable scanner and reply limits

/// Feeds `wire` to one scanner in pieces of the given sizes (repeated), as a client reads it: every complete
/// reply is taken off the front, several at once when a read holds them. Returns the replies
/// with their lengths and, if the stream broke a rule, the error.
fn scan_in_chunks(
    wire: &[u8],
    sizes: &[usize],
    limits: ReplyLimits,
) -> (Vec<(Reply, usize)>, Option<ProtoError>) {
    let mut scanner = ReplyScanner::new(limits);
    let mut buf = Vec::new();
    let mut replies = Vec::new();
    let mut pos = 0;
    for size in sizes.iter().cycle() {
        if pos == wire.len() {
            break;
        }
        let end = wire.len().min(pos + size.max(&1));
        buf.extend_from_slice(&wire[pos..end]);
        pos = end;
        loop {
            match scanner.parse(&buf) {
                Ok(Some((reply, used))) => {
                    buf.drain(..used);
                    replies.push((reply, used));
                }
                Ok(None) => break,
                Err(e) => return (replies, Some(e)),
            }
        }
    }
    (replies, None)
}

/// The same stream parsed whole, each reply scanned from scratch.
fn scan_whole(wire: &[u8], limits: ReplyLimits) -> (Vec<(Reply, usize)>, Option<ProtoError>) {
    let mut pos = 0;
    let mut replies = Vec::new();
    loop {
        match ReplyScanner::new(limits).parse(&wire[pos..]) {
            Ok(Some((reply, used))) => {
                pos += used;
                replies.push((reply, used));
            }
            Ok(None) => return (replies, None),
            Err(e) => return (replies, Some(e)),
        }
    }
}

fn continuation_flood(line: &[u8], count: usize) -> Vec<u8> {
    let mut wire = Vec::new();
    for _ in 0..count {
        wire.extend_from_slice(b"250-");
        wire.extend_from_slice(line);
        wire.extend_from_slice(b"\r\n");
    }
    wire
}

#[test]
fn scanner_takes_pipelined_replies_in_any_pieces() {
    let wire: &[u8] = b"220 mx ESMTP\r\n250-mx\r\n250-PIPELINING\r\n250 SIZE 10\r\n\
        250 2.1.0 ok\r\n550-5.1.1 no\n550 5.1.1 such user\r\n354 go\r\n250 q";
    let (whole, err) = scan_whole(wire, ReplyLimits::default());
    assert!(err.is_none());
    let codes: Vec<u16> = whole.iter().map(|(r, _)| r.code).collect();
    assert_eq!(codes, [220, 250, 250, 550, 354]);
    for chunk in 1..=wire.len() {
        let (pieces, err) = scan_in_chunks(wire, &[chunk], ReplyLimits::default());
        assert!(err.is_none(), "chunk {chunk}: {err:?}");
        assert_eq!(pieces, whole, "chunk {chunk}");
    }
}

#[test]
fn scanner_never_looks_at_bytes_twice() {
    // Complete lines are checked once: garbage put in their place afterwards goes unseen, so
    // a resumed scan did not start again from byte 0.
    let mut scanner = ReplyScanner::default();
    assert!(scanner.scan(b"250-first\r\n250-sec").unwrap().is_none());
    let resumed: &[u8] = b"XXX-first\r\n250-second\r\n250 third\r\n";
    let (reply, used) = scanner.parse(resumed).unwrap().unwrap();
    assert_eq!(used, resumed.len());
    assert_eq!(reply.lines, ["first", "second", "third"]);
    assert!(ReplyScanner::default().scan(resumed).is_err());
    // Nor is the part of a line already searched for its end: a line feed put there goes
    // unseen, where a fresh scan of the same bytes finds it.
    let mut scanner = ReplyScanner::default();
    assert!(scanner.scan(b"250 abc").unwrap().is_none());
    assert_eq!(scanner.scan(b"250 a\nc def\r\n").unwrap(), Some(13));
    assert_eq!(
        ReplyScanner::default().scan(b"250 a\nc def\r\n").unwrap(),
        Some(6)
    );
}

#[test]
fn scanner_starts_afresh_after_a_reply_or_on_a_shorter_buffer() {
    let mut scanner = ReplyScanner::default();
    assert_eq!(scanner.scan(b"250 a\r\n").unwrap(), Some(7));
    assert_eq!(scanner.scan(b"251 b\r\n").unwrap(), Some(7));
    assert!(scanner
        .scan(b"550-5.1.1 long continuation")
        .unwrap()
        .is_none());
    // Not the buffer it was resuming on: no out-of-range positions, just a new scan.
    assert_eq!(scanner.scan(b"221 bye\r\n").unwrap(), Some(9));
}

#[test]
fn reply_line_limit() {
    let limits = ReplyLimits {
        max_lines: 4,
        ..ReplyLimits::default()
    };
    let four = b"250-a\r\n250-b\r\n250-c\r\n250 d\r\n";
    let (reply, used) = ReplyScanner::new(limits).parse(four).unwrap().unwrap();
    assert_eq!((reply.lines.len(), used), (4, four.len()));
    // The fourth line continuing is enough to know there will be a fifth: no need to wait.
    let res = ReplyScanner::new(limits).scan(b"250-a\r\n250-b\r\n250-c\r\n250-d\r\n");
    assert!(
        matches!(res, Err(ProtoError::ReplyTooManyLines { limit: 4 })),
        "{res:?}"
    );
    assert_eq!(
        ReplyScanner::new(limits)
            .scan(b"250-a\r\n250-b\r\n250-c\r\n250-")
            .unwrap(),
        None
    );
    // The default: 128 lines pass, a 129th does not.
    let mut max = continuation_flood(b"x", 127);
    max.extend_from_slice(b"250 last\r\n");
    let (reply, _) = parse_all(&max);
    assert_eq!(reply.lines.len(), MAX_REPLY_LINES);
    let over = continuation_flood(b"x", 128);
    assert!(matches!(
        parse_reply(&over, MAX_REPLY_LINE),
        Err(ProtoError::ReplyTooManyLines { limit: 128 })
    ));
}

#[test]
fn reply_byte_limit() {
    let limits = ReplyLimits {
        max_line: 20,
        max_lines: 100,
        max_bytes: 24,
    };
    // 24 bytes exactly.
    let exact = b"250-123456\r\n250 abcdef\r\n";
    assert_eq!(exact.len(), 24);
    assert_eq!(ReplyScanner::new(limits).scan(exact).unwrap(), Some(24));
    let res = ReplyScanner::new(limits).scan(b"250-123456\r\n250 abcdefg\r\n");
    assert!(
        matches!(res, Err(ProtoError::ReplyTooLarge { limit: 24 })),
        "{res:?}"
    );
    // Unterminated: 23 bytes may still end within the limit, 24 cannot.
    assert!(ReplyScanner::new(limits)
        .scan(&exact[..23])
        .unwrap()
        .is_none());
    let res = ReplyScanner::new(limits).scan(b"250-123456\r\n250 abcdefgh");
    assert!(
        matches!(res, Err(ProtoError::ReplyTooLarge { limit: 24 })),
        "{res:?}"
    );
    // Long lines reach the byte limit before the line limit.
    let long = continuation_flood(&[b'y'; 4000], 9);
    assert!(matches!(
        parse_reply(&long, MAX_REPLY_LINE),
        Err(ProtoError::ReplyTooLarge {
            limit: MAX_REPLY_BYTES
        })
    ));
}

#[test]
fn a_flood_is_refused_at_the_limit_however_much_follows() {
    // Megabytes of continuation lines, then a line that would be a syntax error: the scan
    // stops at the limit and never reaches it.
    for line in [&b"xxxxxxxx"[..], &[b'z'; 1000][..]] {
        let mut wire = b"220 hostile.test ESMTP\r\n".to_vec();
        wire.extend(continuation_flood(line, 4_000_000 / line.len()));
        wire.extend_from_slice(b"not a reply line\r\n");
        let (replies, err) = scan_whole(&wire, ReplyLimits::default());
        assert_eq!(replies.len(), 1);
        assert!(
            matches!(
                err,
                Some(ProtoError::ReplyTooManyLines { .. } | ProtoError::ReplyTooLarge { .. })
            ),
            "{err:?}"
        );
    }
}

#[test]
fn reply_encode() {
    let cases: &[(Reply, &[u8])] = &[
        (Reply::new(250, None, "OK"), b"250 OK\r\n"),
        (
            Reply::new(550, enhanced(5, 1, 1), "No such user"),
            b"550 5.1.1 No such user\r\n",
        ),
        (
            Reply::new(250, None, "evil\r\n250 injected"),
            b"250 evil  250 injected\r\n",
        ),
        (
            Reply {
                code: 250,
                enhanced: None,
                lines: vec!["mx".into(), "PIPELINING".into(), "SIZE 5".into()],
            },
            b"250-mx\r\n250-PIPELINING\r\n250 SIZE 5\r\n",
        ),
        (
            Reply {
                code: 451,
                enhanced: enhanced(4, 3, 0),
                lines: vec!["try".into(), "later".into()],
            },
            b"451-4.3.0 try\r\n451 4.3.0 later\r\n",
        ),
    ];
    for (reply, wire) in cases {
        let mut out = Vec::new();
        reply.encode(&mut out);
        assert_eq!(out, *wire, "{}", String::from_utf8_lossy(&out));
        // Re-encoding a parsed reply reproduces the wire form exactly.
        let (parsed, _) = parse_all(&out);
        let mut again = Vec::new();
        parsed.encode(&mut again);
        assert_eq!(again, out);
        assert_eq!(parsed.text(), reply.text());
    }
}

#[test]
fn reply_classes() {
    let r = |c| Reply::new(c, None, "");
    assert!(r(250).is_positive() && !r(250).is_transient());
    assert!(r(354).is_intermediate());
    assert!(r(421).is_transient() && !r(421).is_permanent());
    assert!(r(554).is_permanent() && !r(554).is_positive());
}

#[test]
fn enhanced_code_from_str() {
    assert_eq!(
        "5.1.1".parse::<EnhancedCode>().unwrap().to_string(),
        "5.1.1"
    );
    assert_eq!(
        "4.7.999".parse::<EnhancedCode>().unwrap(),
        EnhancedCode::new(4, 7, 999)
    );
    for bad in [
        "", "5", "5.1", "5.1.1.1", "3.1.1", "5.1000.1", "5.a.1", "5..1", "55.1.1",
    ] {
        assert!(bad.parse::<EnhancedCode>().is_err(), "{bad}");
    }
}

// --------------------------------------------------------------- commands

#[test]
fn command_encode() {
    let params = |p: &[(&str, Option<&str>)]| {
        p.iter()
            .map(|(k, v)| (k.to_string(), v.map(str::to_string)))
            .collect::<Vec<_>>()
    };
    let cases: Vec<(Command, &[u8])> = vec![
        (
            Command::Ehlo("client.example".into()),
            b"EHLO client.example\r\n",
        ),
        (Command::Helo("[192.0.2.1]".into()), b"HELO [192.0.2.1]\r\n"),
        (
            Command::MailFrom {
                address: "a@b.example".into(),
                params: params(&[("SIZE", Some("123")), ("BODY", Some("8BITMIME"))]),
            },
            b"MAIL FROM:<a@b.example> SIZE=123 BODY=8BITMIME\r\n",
        ),
        (
            Command::MailFrom {
                address: String::new(),
                params: vec![],
            },
            b"MAIL FROM:<>\r\n",
        ),
        (
            Command::RcptTo {
                address: "Postmaster".into(),
                params: vec![],
            },
            b"RCPT TO:<Postmaster>\r\n",
        ),
        (
            Command::RcptTo {
                address: "\u{00fc}ser@b\u{00fc}cher.example".into(),
                params: params(&[("NOTIFY", Some("NEVER"))]),
            },
            "RCPT TO:<\u{00fc}ser@b\u{00fc}cher.example> NOTIFY=NEVER\r\n".as_bytes(),
        ),
        (Command::Data, b"DATA\r\n"),
        (
            Command::Bdat {
                size: 42,
                last: true,
            },
            b"BDAT 42 LAST\r\n",
        ),
        (
            Command::Bdat {
                size: 7,
                last: false,
            },
            b"BDAT 7\r\n",
        ),
        (Command::Rset, b"RSET\r\n"),
        (Command::Noop, b"NOOP\r\n"),
        (Command::Quit, b"QUIT\r\n"),
        (Command::StartTls, b"STARTTLS\r\n"),
        (Command::Vrfy("someone".into()), b"VRFY someone\r\n"),
        (
            Command::Auth {
                mechanism: "PLAIN".into(),
                initial_response: Some("AGEAYg==".into()),
            },
            b"AUTH PLAIN AGEAYg==\r\n",
        ),
        (
            Command::Auth {
                mechanism: "LOGIN".into(),
                initial_response: None,
            },
            b"AUTH LOGIN\r\n",
        ),
    ];
    for (cmd, wire) in cases {
        let mut out = b"prefix".to_vec();
        cmd.encode(&mut out).unwrap();
        assert_eq!(&out[6..], wire, "{cmd:?}");
        // Round trip through the server parser.
        let line = &wire[..wire.len() - 2];
        assert_eq!(Command::parse(line).unwrap(), cmd, "{cmd:?}");
    }
}

#[test]
fn command_encode_rejects_injection_and_bad_arguments() {
    let mail = |a: &str| Command::MailFrom {
        address: a.into(),
        params: vec![],
    };
    let injected = [
        Command::Ehlo("host\r\nRCPT TO:<x@y>".into()),
        Command::Helo("a\nb".into()),
        mail("a@b.example>\r\nRSET"),
        Command::RcptTo {
            address: "x@y.example".into(),
            params: vec![("NOTIFY".into(), Some("NEVER\r\nDATA".into()))],
        },
        Command::RcptTo {
            address: "x@y.example".into(),
            params: vec![("X\0".into(), None)],
        },
        Command::Vrfy("a\rb".into()),
        Command::Auth {
            mechanism: "PLAIN".into(),
            initial_response: Some("abc\r\nQUIT".into()),
        },
    ];
    for cmd in injected {
        let mut out = Vec::new();
        let res = cmd.encode(&mut out);
        assert!(
            matches!(res, Err(ProtoError::InjectedLineBreak)),
            "{cmd:?}: {res:?}"
        );
        assert!(out.is_empty(), "nothing written on error");
    }
    let invalid = [
        Command::Ehlo(String::new()),
        Command::Ehlo("two words".into()),
        mail("no-at-sign"),
        mail("a@b@c"),
        mail("<a@b.example>"),
        Command::RcptTo {
            address: String::new(),
            params: vec![],
        },
        Command::RcptTo {
            address: "x@y.example".into(),
            params: vec![("=bad".into(), None)],
        },
        Command::RcptTo {
            address: "x@y.example".into(),
            params: vec![("K".into(), Some("a b".into()))],
        },
        Command::Vrfy(String::new()),
    ];
    for cmd in invalid {
        let mut out = Vec::new();
        assert!(cmd.encode(&mut out).is_err(), "{cmd:?}");
        assert!(out.is_empty());
    }
}

#[test]
fn command_parse() {
    let p = |k: &str, v: Option<&str>| (k.to_string(), v.map(str::to_string));
    let cases: Vec<(&[u8], Command)> = vec![
        (b"ehlo client", Command::Ehlo("client".into())),
        (b"HeLo client  ", Command::Helo("client".into())),
        (
            b"MAIL FROM:<a@b.example> SIZE=123 BODY=8BITMIME",
            Command::MailFrom {
                address: "a@b.example".into(),
                params: vec![p("SIZE", Some("123")), p("BODY", Some("8BITMIME"))],
            },
        ),
        (
            b"mail from: <a@b.example> smtputf8",
            Command::MailFrom {
                address: "a@b.example".into(),
                params: vec![p("SMTPUTF8", None)],
            },
        ),
        (
            b"MAIL FROM:<>",
            Command::MailFrom {
                address: String::new(),
                params: vec![],
            },
        ),
        (
            b"MAIL FROM:a@b.example",
            Command::MailFrom {
                address: "a@b.example".into(),
                params: vec![],
            },
        ),
        (
            b"RCPT TO:<@relay.example:c@d.example>",
            Command::RcptTo {
                address: "c@d.example".into(),
                params: vec![],
            },
        ),
        (
            b"RCPT TO:<postmaster>",
            Command::RcptTo {
                address: "postmaster".into(),
                params: vec![],
            },
        ),
        (
            b"RCPT TO:<\"odd >quoted\"@d.example> NOTIFY=SUCCESS,FAILURE",
            Command::RcptTo {
                address: "\"odd >quoted\"@d.example".into(),
                params: vec![p("NOTIFY", Some("SUCCESS,FAILURE"))],
            },
        ),
        (b"data", Command::Data),
        (b"NOOP anything", Command::Noop),
        (
            b"bdat 100 last",
            Command::Bdat {
                size: 100,
                last: true,
            },
        ),
        (b"VRFY  bob", Command::Vrfy("bob".into())),
        (
            b"auth plain",
            Command::Auth {
                mechanism: "PLAIN".into(),
                initial_response: None,
            },
        ),
    ];
    for (line, cmd) in cases {
        assert_eq!(
            Command::parse(line).unwrap(),
            cmd,
            "{}",
            String::from_utf8_lossy(line)
        );
    }
}

#[test]
fn command_parse_errors_carry_replies() {
    let long = vec![b'A'; MAX_COMMAND_LINE + 1];
    let cases: Vec<(&[u8], u16, &str)> = vec![
        (b"FOO bar", 500, "5.5.2"),
        (b"", 500, "5.5.2"),
        (b"EXPN list", 502, "5.5.1"),
        (b"EHLO", 501, "5.5.4"),
        (b"MAIL TO:<a@b.example>", 501, "5.5.4"),
        (b"MAIL FROM:<a@b.example", 501, "5.5.4"),
        (b"MAIL FROM:<a@b.example> =x", 501, "5.5.4"),
        (b"MAIL FROM:<not an address>", 501, "5.1.7"),
        (b"MAIL FROM:<a..b@c.example>", 501, "5.1.7"),
        (b"RCPT TO:<>", 501, "5.1.3"),
        (b"RCPT TO:<user>", 501, "5.1.3"),
        (b"DATA now", 501, "5.5.4"),
        (b"QUIT please", 501, "5.5.4"),
        (b"BDAT x", 501, "5.5.4"),
        (b"MAIL FROM:<a@b.example>\rRSET", 501, "5.5.4"),
        (b"\xff\xfe", 501, "5.5.4"),
        (&long, 500, "5.5.6"),
    ];
    for (line, code, enhanced) in cases {
        let err = Command::parse(line).expect_err(&String::from_utf8_lossy(line));
        let reply = err.reply();
        assert_eq!(reply.code, code, "{err:?}");
        assert_eq!(
            reply.enhanced.map(|e| e.to_string()).as_deref(),
            Some(enhanced),
            "{err:?}"
        );
    }
    assert_eq!(
        Command::parse(b"RCPT TO:<bad>"),
        Err(CommandError::BadRecipient("bad".into()))
    );
}

// --------------------------------------------------------------- addresses

#[test]
fn mailboxes() {
    let good = [
        "a@b",
        "user.name+tag@example.com",
        "!#$%&'*+-/=?^_`{|}~@example.com",
        "\"quoted string\"@example.com",
        "\"a@b\"@example.com",
        "\"esc\\\"aped\"@example.com",
        "user@[192.0.2.1]",
        "user@[IPv6:2001:db8::1]",
        "\u{7528}\u{6237}@\u{4f8b}\u{5b50}.\u{5e7f}\u{544a}",
        "a@xn--bcher-kva.example",
        "a@sub-domain.example",
    ];
    for addr in good {
        assert!(
            validate_mailbox(addr).is_ok(),
            "{addr}: {:?}",
            validate_mailbox(addr)
        );
    }
    let long_local = format!("{}@example.com", "a".repeat(65));
    let long_total = format!("{}@{}.com", "a".repeat(64), "b.".repeat(100));
    let bad = [
        "",
        "no-at",
        "@example.com",
        "user@",
        "a b@example.com",
        "<a@example.com>",
        "a@exa mple.com",
        "a\r\n@example.com",
        "a\0@example.com",
        ".a@example.com",
        "a.@example.com",
        "a..b@example.com",
        "a@b@c.example",
        "a@-example.com",
        "a@example-.com",
        "a@example..com",
        "a@example.com.",
        "a@[300.1.1.1]",
        "a@[IPv6:zz::1]",
        "a@[192.0.2.1",
        "\"unterminated@example.com",
        "(comment)a@example.com",
        &long_local,
        &long_total,
    ];
    for addr in bad {
        assert!(validate_mailbox(addr).is_err(), "{addr:?} accepted");
    }
}

// ------------------------------------------------------------ line framing

#[test]
fn line_framing() {
    assert_eq!(
        take_line(b"NOOP\r\nQUIT\r\n", 100).unwrap(),
        Some((&b"NOOP"[..], 6))
    );
    assert_eq!(
        take_line(b"NOOP\nQUIT", 100).unwrap(),
        Some((&b"NOOP"[..], 5))
    );
    assert_eq!(take_line(b"NOOP\r", 100).unwrap(), None);
    assert_eq!(take_line(b"", 100).unwrap(), None);
    assert_eq!(take_line(b"\r\n", 100).unwrap(), Some((&b""[..], 2)));
    assert!(take_line(&[b'x'; 101], 100).is_err());
    assert!(take_line(&[b'x'; 100], 100).unwrap().is_none());
    let mut exact = vec![b'x'; 100];
    exact.push(b'\r');
    assert!(take_line(&exact, 100).unwrap().is_none());
    exact.push(b'\n');
    assert_eq!(take_line(&exact, 100).unwrap().map(|(_, n)| n), Some(102));
    let mut over = vec![b'x'; 101];
    over.extend_from_slice(b"\r\n");
    assert!(matches!(
        take_line(&over, 100),
        Err(ProtoError::LineTooLong { limit: 100 })
    ));
}

// ---------------------------------------------------------- capabilities

#[test]
fn ehlo_capabilities() {
    let wire = b"250-mx.example greets you\r\n\
        250-pipelining\r\n\
        250-SIZE 35882577\r\n\
        250-8BITMIME\r\n\
        250-SMTPUTF8\r\n\
        250-STARTTLS\r\n\
        250-Chunking\r\n\
        250-ENHANCEDSTATUSCODES\r\n\
        250-DSN\r\n\
        250-AUTH LOGIN plain\r\n\
        250-AUTH=LOGIN XOAUTH2\r\n\
        250-X-CUSTOM foo\r\n\
        250 HELP\r\n";
    let (reply, _) = parse_all(wire);
    let caps = Capabilities::from_ehlo(&reply);
    assert_eq!(
        caps,
        Capabilities {
            pipelining: true,
            size: Some(35882577),
            eight_bit_mime: true,
            smtputf8: true,
            starttls: true,
            chunking: true,
            enhanced_status_codes: true,
            dsn: true,
            auth: vec!["LOGIN".into(), "PLAIN".into(), "XOAUTH2".into()],
            other: vec!["X-CUSTOM foo".into(), "HELP".into()],
        }
    );

    let cases: &[(&[u8], Option<u64>)] = &[
        (b"250-mx\r\n250 SIZE\r\n", Some(0)),
        (b"250-mx\r\n250 size 1000\r\n", Some(1000)),
        (b"250-mx\r\n250 SIZE junk\r\n", Some(0)),
        (b"250 mx\r\n", None),
        // The greeting line is never a keyword, even if it looks like one.
        (b"250-SIZE 5\r\n250 8BITMIME\r\n", None),
    ];
    for (wire, size) in cases {
        let (reply, _) = parse_all(wire);
        assert_eq!(Capabilities::from_ehlo(&reply).size, *size, "{wire:?}");
    }
    let (reply, _) = parse_all(b"250-mx\r\n250 AUTH=PLAIN\r\n");
    assert_eq!(Capabilities::from_ehlo(&reply).auth, vec!["PLAIN"]);
}

#[test]
fn capabilities_round_trip() {
    let caps = Capabilities {
        pipelining: true,
        size: Some(1000),
        eight_bit_mime: true,
        smtputf8: false,
        starttls: true,
        chunking: false,
        enhanced_status_codes: true,
        dsn: true,
        auth: vec!["PLAIN".into()],
        other: vec!["X-FOO bar".into()],
    };
    let lines = caps.to_ehlo_lines();
    assert_eq!(lines[0], "PIPELINING");
    assert_eq!(lines[1], "SIZE 1000");
    let mut all = vec!["sink.example".to_string()];
    all.extend(lines);
    let reply = Reply {
        code: 250,
        enhanced: None,
        lines: all,
    };
    assert_eq!(Capabilities::from_ehlo(&reply), caps);
    let unlimited = Capabilities {
        size: Some(0),
        ..Capabilities::default()
    };
    assert_eq!(unlimited.to_ehlo_lines(), vec!["SIZE"]);
}

// ---------------------------------------------------------- dot-stuffing

/// What the receiver must reproduce: bare LF as CRLF, ending in CRLF unless empty.
fn normalise(input: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut prev = 0u8;
    for &b in input {
        if b == b'\n' && prev != b'\r' {
            out.push(b'\r');
        }
        out.push(b);
        prev = b;
    }
    if !out.is_empty() && !out.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    out
}

fn stuff_in_chunks(input: &[u8], chunk: usize) -> Vec<u8> {
    let mut stuffer = DotStuffer::new();
    let mut wire = Vec::new();
    for part in input.chunks(chunk.max(1)) {
        stuffer.stuff(part, &mut wire);
    }
    stuffer.finish(&mut wire);
    wire
}

/// Feeds `wire` followed by a pipelined command in chunks; returns the message
/// and checks that the command was left unconsumed.
fn receive_in_chunks(wire: &[u8], chunk: usize) -> Vec<u8> {
    let mut full = wire.to_vec();
    full.extend_from_slice(b"QUIT\r\n");
    let mut rx = DataReceiver::new();
    let mut msg = Vec::new();
    let mut pos = 0;
    for part in full.chunks(chunk.max(1)) {
        let (used, done) = rx.feed(part, &mut msg);
        pos += used;
        if done {
            assert_eq!(&full[pos..], b"QUIT\r\n");
            return msg;
        }
        assert_eq!(used, part.len());
    }
    panic!("terminator not seen in {wire:?}");
}

const DOT_CASES: &[&[u8]] = &[
    b"",
    b"hello",
    b"hello\r\n",
    b"hello\n",
    b".",
    b".\r\n",
    b"a\r\n.\r\nb\r\n",
    b"a\n.\nb",
    b"..\r\n...\r\n.x\r\n",
    b"line\r\n.\r\n.\r\n",
    b"\r\n\r\n.\r\n",
    b"a\rb\r\n.c",
    b"trailing cr\r",
    b".\r",
    b"\n.\n",
    b"x\r\r\n.\r\r\n",
    b"Subject: hi\r\n\r\nbody\r\n..\r\n.\r\n",
];

#[test]
fn dot_stuffing_known_wire_form() {
    assert_eq!(stuff_in_chunks(b"", 1), b".\r\n");
    assert_eq!(stuff_in_chunks(b"a", 1), b"a\r\n.\r\n");
    assert_eq!(
        stuff_in_chunks(b".a\n..b\r\nc.\n.", 3),
        b"..a\r\n...b\r\nc.\r\n..\r\n.\r\n"
    );
}

#[test]
fn dot_stuffing_round_trip_all_splits() {
    for input in DOT_CASES {
        let expected = normalise(input);
        let reference = stuff_in_chunks(input, input.len().max(1));
        for chunk in 1..=input.len().max(1) {
            let wire = stuff_in_chunks(input, chunk);
            assert_eq!(wire, reference, "stuffer chunk {chunk} of {input:?}");
        }
        for chunk in 1..=reference.len() + 6 {
            assert_eq!(
                receive_in_chunks(&reference, chunk),
                expected,
                "receiver chunk {chunk} of {input:?}"
            );
        }
        // Split the wire form at every single position as well.
        for cut in 0..reference.len() {
            let mut rx = DataReceiver::new();
            let mut msg = Vec::new();
            let (used, done) = rx.feed(&reference[..cut], &mut msg);
            assert_eq!((used, done), (cut, false));
            let (used, done) = rx.feed(&reference[cut..], &mut msg);
            assert!(done);
            assert_eq!(used, reference.len() - cut);
            assert_eq!(msg, expected);
        }
    }
}

#[test]
fn receiver_refuses_smuggled_terminators() {
    // Only CRLF.CRLF ends DATA; the bare-LF variants used for SMTP smuggling
    // are message content.
    for wire in [
        &b"a\n.\nMAIL"[..],
        b"a\r\n.\nMAIL",
        b"a\n.\r\nMAIL",
        b"a\r.\r\nMAIL",
    ] {
        let mut rx = DataReceiver::new();
        let mut msg = Vec::new();
        let (used, done) = rx.feed(wire, &mut msg);
        assert!(!done, "{wire:?}");
        assert_eq!(used, wire.len());
    }
}

#[test]
fn receiver_is_reusable() {
    let mut rx = DataReceiver::new();
    let mut msg = Vec::new();
    let wire = b"one\r\n.\r\ntwo\r\n.\r\n";
    let (used, done) = rx.feed(wire, &mut msg);
    assert!(done);
    assert_eq!(msg, b"one\r\n");
    msg.clear();
    assert_eq!(rx.feed(&wire[used..], &mut msg), (wire.len() - used, true));
    assert_eq!(msg, b"two\r\n");
}

mod props {
    use super::*;
    use proptest::prelude::*;

    fn message_bytes() -> impl Strategy<Value = Vec<u8>> {
        // Mostly the interesting bytes, so dots at line starts are common.
        proptest::collection::vec(
            prop_oneof![
                4 => Just(b'.'),
                4 => Just(b'\r'),
                4 => Just(b'\n'),
                3 => any::<u8>(),
            ],
            0..200,
        )
    }

    /// A few well-formed replies with CRLF or bare LF line ends, then maybe some garbage.
    fn reply_stream(max_text: usize) -> impl Strategy<Value = Vec<u8>> {
        let text = proptest::string::string_regex(&format!("[ -~]{{0,{max_text}}}")).unwrap();
        let line = (text, any::<bool>());
        let reply = (200u16..600, proptest::collection::vec(line, 1..8));
        (
            proptest::collection::vec(reply, 0..5),
            proptest::collection::vec(any::<u8>(), 0..40),
        )
            .prop_map(|(replies, tail)| {
                let mut wire = Vec::new();
                for (code, lines) in replies {
                    let n = lines.len();
                    for (i, (text, crlf)) in lines.into_iter().enumerate() {
                        let sep = if i + 1 == n { ' ' } else { '-' };
                        wire.extend_from_slice(format!("{code}{sep}{text}").as_bytes());
                        wire.extend_from_slice(if crlf { b"\r\n" } else { b"\n" });
                    }
                }
                wire.extend(tail);
                wire
            })
    }

    /// Where the data really ends: after the first CRLF . CRLF, the CRLF of the DATA
    /// command standing before a leading dot.
    fn real_end(wire: &[u8]) -> Option<usize> {
        if wire.starts_with(b".\r\n") {
            return Some(3);
        }
        wire.windows(5)
            .position(|w| w == b"\r\n.\r\n")
            .map(|i| i + 5)
    }

    /// A CR not followed by LF or an LF not preceded by CR (the data follows a CRLF).
    fn has_bare_newline(data: &[u8]) -> bool {
        data.iter().enumerate().any(|(i, &b)| match b {
            b'\n' => i == 0 || data[i - 1] != b'\r',
            b'\r' => data.get(i + 1) != Some(&b'\n'),
            _ => false,
        })
    }

    proptest! {
        #[test]
        fn dot_round_trip(input in message_bytes(), a in 1usize..50, b in 1usize..50) {
            let wire = stuff_in_chunks(&input, a);
            prop_assert_eq!(&wire, &stuff_in_chunks(&input, input.len().max(1)));
            prop_assert_eq!(receive_in_chunks(&wire, b), normalise(&input));
        }

        #[test]
        fn only_crlf_dot_crlf_ends_the_data(
            mut wire in message_bytes(),
            chunk in 1usize..40,
            normalize in any::<bool>(),
        ) {
            wire.extend_from_slice(b"\r\n.\r\nQUIT\r\n");
            let mut rx = if normalize {
                DataReceiver::normalizing()
            } else {
                DataReceiver::new()
            };
            let mut out = Vec::new();
            let mut pos = 0;
            let mut ended = None;
            for part in wire.chunks(chunk) {
                let (used, done) = rx.feed(part, &mut out);
                pos += used;
                if done {
                    ended = Some(pos);
                    break;
                }
                prop_assert_eq!(used, part.len());
            }
            let end = real_end(&wire);
            prop_assert_eq!(ended, end);
            let end = end.unwrap_or(wire.len());
            prop_assert_eq!(rx.saw_bare_newline(), has_bare_newline(&wire[..end]));
            if normalize {
                prop_assert!(!has_bare_newline(&out), "{:?} gave {:?}", wire, out);
            }
        }

        #[test]
        fn reply_round_trip(
            code in 200u16..600,
            enhanced in proptest::option::of((0u16..1000, 0u16..1000)),
            lines in proptest::collection::vec("[ -~]{0,80}", 1..6),
            cut in any::<prop::sample::Index>(),
        ) {
            let class = (code / 100) as u8;
            // RFC 3463 has no class 3.
            let enhanced = enhanced
                .filter(|_| class != 3)
                .map(|(s, d)| EnhancedCode::new(class, s, d));
            let reply = Reply { code, enhanced, lines };
            let mut wire = Vec::new();
            reply.encode(&mut wire);
            let (parsed, used) = parse_reply(&wire, MAX_REPLY_LINE).unwrap().unwrap();
            prop_assert_eq!(used, wire.len());
            prop_assert_eq!(parsed.code, code);
            prop_assert_eq!(parsed.lines.len(), reply.lines.len());
            if enhanced.is_some() {
                prop_assert_eq!(parsed.enhanced, enhanced);
            }
            let mut again = Vec::new();
            parsed.encode(&mut again);
            prop_assert_eq!(&again, &wire);
            let cut = cut.index(wire.len());
            prop_assert!(parse_reply(&wire[..cut], MAX_REPLY_LINE).unwrap().is_none());
        }

        #[test]
        fn reply_fed_in_pieces_parses_as_whole(
            wire in reply_stream(40),
            sizes in proptest::collection::vec(1usize..64, 1..8),
        ) {
            let (whole, whole_err) = scan_whole(&wire, ReplyLimits::default());
            let (pieces, pieces_err) = scan_in_chunks(&wire, &sizes, ReplyLimits::default());
            prop_assert_eq!(pieces, whole);
            prop_assert_eq!(
                pieces_err.map(|e| e.to_string()),
                whole_err.map(|e| e.to_string())
            );
        }

        #[test]
        fn tight_limits_fail_the_same_in_pieces(
            wire in prop_oneof![
                reply_stream(30),
                proptest::collection::vec(any::<u8>(), 0..300),
            ],
            sizes in proptest::collection::vec(1usize..40, 1..8),
        ) {
            let limits = ReplyLimits { max_line: 24, max_lines: 5, max_bytes: 80 };
            let (whole, whole_err) = scan_whole(&wire, limits);
            let (pieces, pieces_err) = scan_in_chunks(&wire, &sizes, limits);
            // Pieces may reveal a limit before the line that would have shown a syntax
            // error is complete, so only the fact of an error must agree.
            prop_assert_eq!(pieces, whole);
            prop_assert_eq!(pieces_err.is_some(), whole_err.is_some());
        }

        #[test]
        fn continuation_flood_fails_at_the_limit(
            len in 0usize..300,
            sizes in proptest::collection::vec(1usize..5000, 1..4),
        ) {
            let line_bytes = 4 + len + 2;
            let wire = continuation_flood(&vec![b'x'; len], 40_000 / line_bytes + MAX_REPLY_LINES);
            let mut scanner = ReplyScanner::default();
            let mut fed = 0;
            let mut err = None;
            for size in sizes.iter().cycle() {
                prop_assert!(fed < wire.len(), "the whole flood was accepted");
                fed = wire.len().min(fed + size);
                match scanner.scan(&wire[..fed]) {
                    Ok(None) => {}
                    Ok(Some(used)) => prop_assert!(false, "a reply of {} bytes", used),
                    Err(e) => {
                        err = Some(e);
                        break;
                    }
                }
            }
            let largest = sizes.iter().max().copied().unwrap_or(0);
            prop_assert!(fed <= MAX_REPLY_BYTES + largest, "{} bytes fed", fed);
            if MAX_REPLY_LINES * line_bytes <= MAX_REPLY_BYTES {
                prop_assert!(
                    matches!(err, Some(ProtoError::ReplyTooManyLines { limit: MAX_REPLY_LINES })),
                    "{:?}", err
                );
            } else {
                prop_assert!(
                    matches!(err, Some(ProtoError::ReplyTooLarge { limit: MAX_REPLY_BYTES })),
                    "{:?}", err
                );
            }
        }

        #[test]
        fn reply_parser_never_panics(input in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = parse_reply(&input, 64);
        }

        #[test]
        fn command_parser_never_panics(input in proptest::collection::vec(any::<u8>(), 0..300)) {
            if let Ok(cmd) = Command::parse(&input) {
                // Whatever the parser accepts, the encoder can write back
                // without breaking framing.
                let mut out = Vec::new();
                if cmd.encode(&mut out).is_ok() {
                    prop_assert!(out.ends_with(b"\r\n"));
                    prop_assert_eq!(out.iter().filter(|&&b| b == b'\n').count(), 1);
                }
            }
        }
    }
}

// --------------------------------------------------------- server session

mod server_session {
    use smtp_proto::server::{
        Action, BareNewlines, Event, ServerConfig, ServerSession, SessionState,
    };
    use smtp_proto::{enhanced, Capabilities, Reply};

    fn ok() -> Reply {
        Reply::new(250, None, "OK")
    }

    fn greeted() -> ServerSession {
        let mut s = ServerSession::new(ServerConfig {
            hostname: "mx.test".into(),
            ..ServerConfig::default()
        });
        assert_eq!(s.greeting().code, 220);
        s
    }

    /// Handles a line, accepting any decision with `decision_reply`.
    fn step(s: &mut ServerSession, line: &str, decision_reply: Reply) -> Action {
        match s.handle_line(line.as_bytes()) {
            Action::Decide(d) => s.decide(d, decision_reply),
            other => other,
        }
    }

    fn code(action: &Action) -> u16 {
        action.reply().map(|r| r.code).unwrap_or(0)
    }

    #[test]
    fn full_transaction() {
        let mut s = greeted();
        assert_eq!(s.state(), SessionState::ExpectHelo);
        let ehlo = s.handle_line(b"EHLO client.test");
        let Action::Reply(r) = &ehlo else {
            panic!("{ehlo:?}")
        };
        assert_eq!(r.lines[0], "mx.test greets client.test");
        assert!(r.lines.contains(&"PIPELINING".to_string()));
        assert_eq!(s.helo(), Some("client.test"));

        let Action::Decide(d) = s.handle_line(b"MAIL FROM:<a@b.test> SIZE=10 BODY=8BITMIME") else {
            panic!()
        };
        assert!(matches!(d.event(), Event::MailFrom { address, .. } if address == "a@b.test"));
        assert_eq!(code(&s.decide(d, ok())), 250);
        assert_eq!(s.state(), SessionState::ExpectRcpt);
        assert_eq!(s.sender(), Some("a@b.test"));

        // A refused recipient leaves the state alone.
        let Action::Decide(d) = s.handle_line(b"RCPT TO:<x@b.test>") else {
            panic!()
        };
        assert_eq!(code(&s.decide(d, Reply::new(550, None, "no"))), 550);
        assert_eq!(s.state(), SessionState::ExpectRcpt);
        assert_eq!(code(&s.handle_line(b"DATA")), 554);

        assert_eq!(code(&step(&mut s, "RCPT TO:<c@d.test>", ok())), 250);
        assert_eq!(code(&step(&mut s, "RCPT TO:<e@d.test>", ok())), 250);
        assert_eq!(s.recipients(), ["c@d.test", "e@d.test"]);
        let start = s.handle_line(b"DATA");
        assert!(matches!(&start, Action::StartData(r) if r.code == 354));
        assert!(s.is_receiving_data());

        let mut msg = Vec::new();
        let wire = b"Subject: x\r\n\r\n..dot\r\n.\r\nQUIT\r\n";
        let (used, action) = s.handle_data(&wire[..5], &mut msg);
        assert_eq!((used, action), (5, None));
        let (used2, action) = s.handle_data(&wire[5..], &mut msg);
        assert_eq!(&wire[5 + used2..], b"QUIT\r\n");
        assert_eq!(msg, b"Subject: x\r\n\r\n.dot\r\n");
        let Some(Action::Decide(d)) = action else {
            panic!()
        };
        assert_eq!(
            d.event(),
            &Event::DataEnd {
                sender: "a@b.test".into(),
                recipients: vec!["c@d.test".into(), "e@d.test".into()],
                size: msg.len() as u64,
            }
        );
        assert_eq!(code(&s.decide(d, ok())), 250);
        assert_eq!(s.state(), SessionState::ExpectMail);
        assert_eq!(s.sender(), None);
        let quit = s.handle_line(b"QUIT");
        assert!(matches!(&quit, Action::Close(r) if r.code == 221));
        assert!(s.is_closed());
        assert_eq!(used, 5);
    }

    #[test]
    fn sequencing() {
        // (commands leading up, command under test, expected code, enhanced)
        let cases: &[(&[&str], &str, u16, &str)] = &[
            (&[], "MAIL FROM:<a@b.test>", 503, "5.5.1"),
            (&[], "RCPT TO:<a@b.test>", 503, "5.5.1"),
            (&[], "DATA", 503, "5.5.1"),
            (&["HELO c"], "RCPT TO:<a@b.test>", 503, "5.5.1"),
            (&["HELO c"], "DATA", 503, "5.5.1"),
            (&["HELO c", "MAIL FROM:<>"], "MAIL FROM:<>", 503, "5.5.1"),
            (&["HELO c", "MAIL FROM:<>"], "DATA", 554, "5.5.1"),
            (
                &["HELO c", "MAIL FROM:<>", "RSET"],
                "RCPT TO:<a@b.test>",
                503,
                "5.5.1",
            ),
            (&["HELO c", "MAIL FROM:<>", "EHLO c"], "DATA", 503, "5.5.1"),
            (&[], "NOOP", 250, "2.0.0"),
            (&[], "VRFY bob", 252, "2.5.2"),
            (&[], "RSET", 250, "2.0.0"),
            (&[], "FROB", 500, "5.5.2"),
            (&[], "STARTTLS", 502, "5.5.1"),
            (&[], "AUTH PLAIN", 502, "5.5.1"),
            (
                &["HELO c"],
                "MAIL FROM:<a@b.test> SIZE=999999999999",
                552,
                "5.3.4",
            ),
            (&["HELO c"], "MAIL FROM:<a@b.test> SIZE=abc", 501, "5.5.4"),
            (&["HELO c"], "MAIL FROM:<a@b.test> FOO=bar", 555, "5.5.4"),
            (&["HELO c"], "MAIL FROM:<a@b.test> RET=HDRS", 555, "5.5.4"),
            (&["HELO c"], "MAIL FROM:<bad address>", 501, "5.1.7"),
            (&["HELO c", "MAIL FROM:<>"], "RCPT TO:<x>", 501, "5.1.3"),
            (
                &["HELO c", "MAIL FROM:<>"],
                "RCPT TO:<x@y.test> NOTIFY=NEVER",
                555,
                "5.5.4",
            ),
        ];
        for (setup, line, want, enhanced) in cases {
            let mut s = greeted();
            for l in *setup {
                let a = step(&mut s, l, ok());
                assert!(code(&a) < 400, "{l}: {a:?}");
            }
            let a = step(&mut s, line, ok());
            let r = a.reply().expect("reply");
            assert_eq!(r.code, *want, "{setup:?} then {line}: {r:?}");
            assert_eq!(
                r.enhanced.map(|e| e.to_string()).as_deref(),
                Some(*enhanced)
            );
        }
    }

    #[test]
    fn before_greeting_and_after_close() {
        let mut s = ServerSession::new(ServerConfig::default());
        assert_eq!(code(&s.handle_line(b"EHLO x")), 503);
        let _ = s.greeting();
        assert_eq!(code(&s.handle_line(b"HELO x")), 250);
        assert!(matches!(s.handle_line(b"QUIT"), Action::Close(_)));
        assert!(matches!(s.handle_line(b"NOOP"), Action::Close(_)));
    }

    #[test]
    fn too_many_errors_closes() {
        let mut s = ServerSession::new(ServerConfig {
            max_errors: 3,
            ..ServerConfig::default()
        });
        let _ = s.greeting();
        assert_eq!(code(&s.handle_line(b"junk")), 500);
        assert_eq!(code(&s.line_too_long()), 500);
        let last = s.handle_line(b"junk");
        assert!(matches!(&last, Action::Close(r) if r.code == 421));
        assert!(s.is_closed());
    }

    #[test]
    fn decision_421_closes() {
        let mut s = greeted();
        let _ = step(&mut s, "HELO c", ok());
        let a = step(&mut s, "MAIL FROM:<a@b.test>", Reply::new(421, None, "bye"));
        assert!(matches!(a, Action::Close(_)));
        assert!(s.is_closed());
    }

    #[test]
    fn oversized_message_gets_552() {
        let mut s = ServerSession::new(ServerConfig {
            capabilities: Capabilities {
                size: Some(10),
                ..Capabilities::default()
            },
            ..ServerConfig::default()
        });
        let _ = s.greeting();
        for l in ["HELO c", "MAIL FROM:<a@b.test>", "RCPT TO:<c@d.test>"] {
            assert_eq!(code(&step(&mut s, l, ok())), 250);
        }
        assert!(matches!(s.handle_line(b"DATA"), Action::StartData(_)));
        let mut sink = Vec::new();
        let (_, a) = s.handle_data(b"0123456789abcdef\r\n.\r\n", &mut sink);
        let r = a.expect("done");
        assert_eq!(r.reply().map(|r| r.code), Some(552));
        assert_eq!(s.state(), SessionState::ExpectMail);
    }

    /// A session with `mode`, in DATA with one recipient.
    fn in_data(mode: BareNewlines) -> ServerSession {
        let mut s = ServerSession::new(ServerConfig {
            bare_newlines: mode,
            ..ServerConfig::default()
        });
        let _ = s.greeting();
        for l in ["HELO c", "MAIL FROM:<a@b.test>", "RCPT TO:<c@d.test>"] {
            assert_eq!(code(&step(&mut s, l, ok())), 250);
        }
        assert!(matches!(s.handle_line(b"DATA"), Action::StartData(_)));
        s
    }

    /// A bare LF, then a smuggling attempt: a forged transaction after `LF . LF`.
    const BARE: &[u8] =
        b"Subject: x\r\n\r\nline\nMAIL FROM:<f@b.test>\n.\nRCPT TO:<v@d.test>\r\n.\r\nNOOP\r\n";

    #[test]
    fn bare_newlines_are_refused_by_default() {
        assert_eq!(ServerConfig::default().bare_newlines, BareNewlines::Reject);
        let mut s = in_data(BareNewlines::Reject);
        let mut msg = Vec::new();
        let (used, action) = s.handle_data(BARE, &mut msg);
        assert_eq!(&BARE[used..], b"NOOP\r\n", "only CRLF.CRLF ends the data");
        let action = action.expect("done");
        let Action::Reply(r) = &action else {
            panic!("no policy decision for a refused message: {action:?}")
        };
        assert_eq!(r.code, 550);
        assert_eq!(r.enhanced.map(|e| e.to_string()).as_deref(), Some("5.6.11"));
        // The transaction is over; the session carries on.
        assert_eq!(s.state(), SessionState::ExpectMail);
        assert_eq!(s.sender(), None);
        assert_eq!(code(&s.handle_line(b"NOOP")), 250);
        // A clean message afterwards is accepted.
        for l in ["MAIL FROM:<a@b.test>", "RCPT TO:<c@d.test>"] {
            assert_eq!(code(&step(&mut s, l, ok())), 250);
        }
        assert!(matches!(s.handle_line(b"DATA"), Action::StartData(_)));
        msg.clear();
        let (_, action) = s.handle_data(b"clean\r\n.\r\n", &mut msg);
        assert!(matches!(action, Some(Action::Decide(_))), "{action:?}");
        assert!(!s.saw_bare_newline());
    }

    #[test]
    fn bare_newlines_can_be_normalized_or_kept() {
        for (mode, want) in [
            (
                BareNewlines::Normalize,
                &b"Subject: x\r\n\r\nline\r\nMAIL FROM:<f@b.test>\r\n.\r\nRCPT TO:<v@d.test>\r\n"[..],
            ),
            (
                BareNewlines::Keep,
                &b"Subject: x\r\n\r\nline\nMAIL FROM:<f@b.test>\n.\nRCPT TO:<v@d.test>\r\n"[..],
            ),
        ] {
            let mut s = in_data(mode);
            let mut msg = Vec::new();
            let (used, action) = s.handle_data(BARE, &mut msg);
            assert_eq!(&BARE[used..], b"NOOP\r\n", "{mode:?}");
            let Some(Action::Decide(d)) = action else {
                panic!("{mode:?}: {action:?}")
            };
            assert!(matches!(d.event(), Event::DataEnd { .. }));
            // The policy can tell, and refuse the message itself.
            assert!(s.saw_bare_newline(), "{mode:?}");
            assert_eq!(
                String::from_utf8_lossy(&msg),
                String::from_utf8_lossy(want),
                "{mode:?}"
            );
            assert_eq!(code(&s.decide(d, ok())), 250);
        }
    }

    #[test]
    fn too_many_recipients() {
        let mut s = ServerSession::new(ServerConfig {
            max_recipients: 1,
            ..ServerConfig::default()
        });
        let _ = s.greeting();
        for l in ["HELO c", "MAIL FROM:<a@b.test>", "RCPT TO:<c@d.test>"] {
            assert_eq!(code(&step(&mut s, l, ok())), 250);
        }
        assert_eq!(code(&step(&mut s, "RCPT TO:<e@d.test>", ok())), 452);
    }

    #[test]
    fn starttls_resets() {
        let mut s = ServerSession::new(ServerConfig {
            capabilities: Capabilities {
                starttls: true,
                ..Capabilities::default()
            },
            ..ServerConfig::default()
        });
        let _ = s.greeting();
        let _ = step(&mut s, "EHLO c", ok());
        assert!(matches!(s.handle_line(b"STARTTLS"), Action::StartTls(r) if r.code == 220));
        s.tls_established();
        assert_eq!(s.helo(), None);
        assert_eq!(code(&s.handle_line(b"MAIL FROM:<>")), 503);
    }

    #[test]
    fn bdat_without_chunking_closes() {
        let mut s = greeted();
        let _ = step(&mut s, "EHLO c", ok());
        assert!(matches!(s.handle_line(b"BDAT 10 LAST"), Action::Close(r) if r.code == 502));
    }

    // ----------------------------------------------------------------- AUTH

    fn auth_session(requires_tls: bool) -> ServerSession {
        let mut s = ServerSession::new(ServerConfig {
            hostname: "mx.test".into(),
            capabilities: Capabilities {
                auth: vec!["PLAIN".into(), "LOGIN".into()],
                ..ServerConfig::default().capabilities
            },
            auth_requires_tls: requires_tls,
            ..ServerConfig::default()
        });
        let _ = s.greeting();
        s
    }

    fn ehlo_lines(s: &mut ServerSession) -> Vec<String> {
        match s.handle_line(b"EHLO c.test") {
            Action::Reply(r) => r.lines,
            other => panic!("{other:?}"),
        }
    }

    fn expect_auth(action: Action) -> (smtp_proto::server::Decision, Event) {
        match action {
            Action::Decide(d) => {
                let event = d.event().clone();
                (d, event)
            }
            other => panic!("expected an AUTH decision, got {other:?}"),
        }
    }

    fn auth_event(mechanism: &str, authzid: &str, user: &str, password: &str) -> Event {
        Event::Auth {
            mechanism: mechanism.into(),
            authorization_id: authzid.into(),
            username: user.into(),
            password: password.into(),
        }
    }

    fn success() -> Reply {
        Reply::new(235, enhanced(2, 7, 0), "Authentication successful")
    }

    fn failure() -> Reply {
        Reply::new(535, enhanced(5, 7, 8), "Authentication credentials invalid")
    }

    #[test]
    fn auth_is_advertised_only_when_configured_and_allowed() {
        let mut plain = greeted();
        assert!(!ehlo_lines(&mut plain).iter().any(|l| l.starts_with("AUTH")));
        assert_eq!(code(&plain.handle_line(b"AUTH PLAIN AGEAYg==")), 502);

        let mut s = auth_session(false);
        assert!(ehlo_lines(&mut s).contains(&"AUTH PLAIN LOGIN".to_string()));

        let mut s = auth_session(true);
        assert!(!ehlo_lines(&mut s).iter().any(|l| l.starts_with("AUTH")));
        let a = s.handle_line(b"AUTH PLAIN AHVzZXIAc2VjcmV0");
        let r = a.reply().expect("reply");
        assert_eq!(r.code, 538);
        assert_eq!(r.enhanced, enhanced(5, 7, 11));
        assert_eq!(s.authenticated(), None);
    }

    #[test]
    fn auth_plain_with_initial_response() {
        let mut s = auth_session(false);
        let _ = ehlo_lines(&mut s);
        // "\0user\0secret"
        let (d, event) = expect_auth(s.handle_line(b"AUTH PLAIN AHVzZXIAc2VjcmV0"));
        assert_eq!(event, auth_event("PLAIN", "", "user", "secret"));
        let a = s.decide(d, success());
        assert_eq!(code(&a), 235);
        assert_eq!(s.authenticated(), Some("user"));
        assert_eq!(s.state(), SessionState::ExpectMail);
        // Authentication survives EHLO and RSET, and cannot be repeated.
        let _ = ehlo_lines(&mut s);
        assert_eq!(code(&s.handle_line(b"RSET")), 250);
        assert_eq!(s.authenticated(), Some("user"));
        let again = s.handle_line(b"AUTH PLAIN AHVzZXIAc2VjcmV0");
        assert_eq!(code(&again), 503);
        // MAIL works afterwards, with the AUTH parameter accepted.
        assert_eq!(
            code(&step(&mut s, "MAIL FROM:<a@b.test> AUTH=<>", ok())),
            250
        );
    }

    #[test]
    fn auth_plain_with_challenge_and_authzid() {
        let mut s = auth_session(false);
        let _ = ehlo_lines(&mut s);
        let challenge = s.handle_line(b"AUTH plain");
        assert!(
            matches!(&challenge, Action::Reply(r) if r.code == 334),
            "{challenge:?}"
        );
        let mut wire = Vec::new();
        challenge.reply().expect("reply").encode(&mut wire);
        assert_eq!(wire, b"334 \r\n");
        assert_eq!(s.state(), SessionState::ExpectAuthResponse);
        // "admin\0user\0pw" without padding.
        let (d, event) = expect_auth(s.handle_line(b"YWRtaW4AdXNlcgBwdw"));
        assert_eq!(event, auth_event("PLAIN", "admin", "user", "pw"));
        assert_eq!(code(&s.decide(d, success())), 235);
    }

    #[test]
    fn auth_login_two_challenges() {
        let mut s = auth_session(false);
        let _ = ehlo_lines(&mut s);
        let a = s.handle_line(b"AUTH LOGIN");
        assert!(
            matches!(&a, Action::Reply(r) if r.code == 334 && r.text() == "VXNlcm5hbWU6"),
            "{a:?}"
        );
        let a = s.handle_line(b"dXNlcg==");
        assert!(
            matches!(&a, Action::Reply(r) if r.code == 334 && r.text() == "UGFzc3dvcmQ6"),
            "{a:?}"
        );
        let (d, event) = expect_auth(s.handle_line(b"c2VjcmV0"));
        assert_eq!(event, auth_event("LOGIN", "", "user", "secret"));
        assert_eq!(code(&s.decide(d, success())), 235);
        assert_eq!(s.authenticated(), Some("user"));

        // LOGIN with the user name as initial response skips the first challenge.
        let mut s = auth_session(false);
        let _ = ehlo_lines(&mut s);
        let a = s.handle_line(b"AUTH LOGIN dXNlcg==");
        assert!(
            matches!(&a, Action::Reply(r) if r.text() == "UGFzc3dvcmQ6"),
            "{a:?}"
        );
        let (_d, event) = expect_auth(s.handle_line(b"c2VjcmV0"));
        assert_eq!(event, auth_event("LOGIN", "", "user", "secret"));
    }

    #[test]
    fn auth_failure_cancel_and_garbage() {
        let mut s = auth_session(false);
        let _ = ehlo_lines(&mut s);
        let (d, _) = expect_auth(s.handle_line(b"AUTH PLAIN AHVzZXIAd3Jvbmc="));
        let a = s.decide(d, failure());
        let r = a.reply().expect("reply");
        assert_eq!((r.code, r.enhanced), (535, enhanced(5, 7, 8)));
        assert_eq!(s.authenticated(), None);
        assert_eq!(s.state(), SessionState::ExpectMail);

        // "*" cancels; the next line is a command again.
        assert_eq!(code(&s.handle_line(b"AUTH LOGIN")), 334);
        assert_eq!(code(&s.handle_line(b"*")), 501);
        assert_eq!(code(&s.handle_line(b"NOOP")), 250);

        // Not base64, not three PLAIN fields, unknown mechanism.
        assert_eq!(code(&s.handle_line(b"AUTH PLAIN !!!!")), 501);
        assert_eq!(code(&s.handle_line(b"AUTH PLAIN dXNlcg==")), 501);
        assert_eq!(code(&s.handle_line(b"AUTH CRAM-MD5")), 504);
        assert_eq!(s.state(), SessionState::ExpectMail);
    }

    #[test]
    fn auth_sequencing() {
        let mut s = auth_session(false);
        assert_eq!(code(&s.handle_line(b"AUTH PLAIN AHVzZXIAc2VjcmV0")), 503);
        let _ = ehlo_lines(&mut s);
        assert_eq!(code(&step(&mut s, "MAIL FROM:<a@b.test>", ok())), 250);
        assert_eq!(code(&s.handle_line(b"AUTH PLAIN AHVzZXIAc2VjcmV0")), 503);
    }

    #[test]
    fn failed_auth_counts_as_an_error() {
        let mut s = ServerSession::new(ServerConfig {
            capabilities: Capabilities {
                auth: vec!["PLAIN".into()],
                ..Capabilities::default()
            },
            max_errors: 2,
            ..ServerConfig::default()
        });
        let _ = s.greeting();
        let _ = ehlo_lines(&mut s);
        let (d, _) = expect_auth(s.handle_line(b"AUTH PLAIN AHUAcA=="));
        assert_eq!(code(&s.decide(d, failure())), 535);
        let (d, _) = expect_auth(s.handle_line(b"AUTH PLAIN AHUAcA=="));
        let a = s.decide(d, failure());
        assert!(matches!(a, Action::Close(r) if r.code == 421));
        assert!(s.is_closed());
    }

    #[test]
    fn starttls_forgets_authentication() {
        let mut s = auth_session(false);
        let _ = ehlo_lines(&mut s);
        let (d, _) = expect_auth(s.handle_line(b"AUTH PLAIN AHVzZXIAc2VjcmV0"));
        let _ = s.decide(d, success());
        s.tls_established();
        assert_eq!(s.authenticated(), None);
    }
}
