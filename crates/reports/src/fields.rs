//! Header-style field blocks: the header section of a returned message and the field groups
//! of `message/delivery-status` and `message/feedback-report` bodies.
//!
//! mail-parser maps field names to its own enum and keeps no blank-line grouping, and the
//! report bodies are not MIME headers at all, so this small reader does both: names as
//! written, values unfolded (a fold becomes one space) and trimmed, blank lines kept as group
//! ends.

/// Most fields read from one block of text: a bound on work and memory whatever the input.
const MAX_FIELDS: usize = 20_000;
/// Longest value kept for one field; longer ones are cut (on a character boundary).
const MAX_VALUE: usize = 8 * 1024;

/// One field: its name as written and its unfolded, trimmed value.
pub(crate) type Field = (String, String);

/// Lines of `text` with any `\r` before the `\n` removed.
pub(crate) fn lines(text: &str) -> impl Iterator<Item = &str> {
    text.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l))
}

/// The field name of `line` (`Name: value`), if it has one: printable ASCII without spaces
/// before the colon (whitespace just before the colon is tolerated, as in `Subject :`).
fn split_field(line: &str) -> Option<(&str, &str)> {
    let colon = line.find(':')?;
    let name = line[..colon].trim_end();
    if name.is_empty() || !name.bytes().all(|b| (33..=126).contains(&b)) {
        return None;
    }
    Some((name, &line[colon + 1..]))
}

fn push_value(value: &mut String, more: &str) {
    let more = more.trim();
    if more.is_empty() || value.len() >= MAX_VALUE {
        return;
    }
    if !value.is_empty() {
        value.push(' ');
    }
    let room = MAX_VALUE.saturating_sub(value.len());
    if more.len() <= room {
        value.push_str(more);
    } else {
        let mut end = room;
        while !more.is_char_boundary(end) {
            end -= 1;
        }
        value.push_str(&more[..end]);
    }
}

/// The header section at the start of `text`: fields up to the first blank line, or up to
/// the first line that is neither a field nor a continuation (a truncated copy, or a body
/// that starts without a blank line). A leading mbox `From ` line is skipped.
pub(crate) fn header_section(text: &str) -> Vec<Field> {
    let mut out: Vec<Field> = Vec::new();
    let mut first = true;
    for line in lines(text) {
        if first {
            first = false;
            if line.starts_with("From ") {
                continue;
            }
        }
        if line.trim().is_empty() {
            break;
        }
        if line.starts_with([' ', '\t']) {
            if let Some((_, value)) = out.last_mut() {
                push_value(value, line);
                continue;
            }
            // Whitespace before the first field: tolerated, as in a part body with a stray
            // indented line.
            continue;
        }
        match split_field(line) {
            Some((name, value)) if out.len() < MAX_FIELDS => {
                let mut v = String::new();
                push_value(&mut v, value);
                out.push((name.to_string(), v));
            }
            Some(_) => break,
            None => break,
        }
    }
    out
}

/// Field groups separated by blank lines, as in the body of a `message/delivery-status`
/// part. Lines that are not fields are skipped rather than ending the block: real reports
/// carry stray comment lines.
pub(crate) fn groups(text: &str) -> Vec<Vec<Field>> {
    let mut out: Vec<Vec<Field>> = Vec::new();
    let mut current: Vec<Field> = Vec::new();
    let mut total = 0usize;
    for line in lines(text) {
        if line.trim().is_empty() {
            if !current.is_empty() {
                out.push(std::mem::take(&mut current));
            }
            continue;
        }
        if line.starts_with([' ', '\t']) {
            if let Some((_, value)) = current.last_mut() {
                push_value(value, line);
            }
            continue;
        }
        if let Some((name, value)) = split_field(line) {
            if total >= MAX_FIELDS {
                break;
            }
            total += 1;
            let mut v = String::new();
            push_value(&mut v, value);
            current.push((name.to_string(), v));
        }
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

/// The first value of field `name` (case-insensitive).
pub(crate) fn get<'a>(fields: &'a [Field], name: &str) -> Option<&'a str> {
    fields
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unfolds_and_keeps_names_as_written() {
        let f = header_section(
            "From x\r\nreturn-path: <a@b.c>\r\nSubject: one\r\n\ttwo\r\n  three\r\n\r\nbody: no\r\n",
        );
        assert_eq!(
            f,
            vec![
                ("return-path".to_string(), "<a@b.c>".to_string()),
                ("Subject".to_string(), "one two three".to_string()),
            ]
        );
    }

    #[test]
    fn groups_split_on_blank_lines_and_skip_junk() {
        let g = groups("A: 1\nnot a field\nB: 2\n  more\n\n\nC: 3\n");
        assert_eq!(g.len(), 2);
        assert_eq!(get(&g[0], "b"), Some("2 more"));
        assert_eq!(get(&g[1], "C"), Some("3"));
    }

    #[test]
    fn long_values_are_cut_on_a_char_boundary() {
        let long = "é".repeat(MAX_VALUE);
        let f = header_section(&format!("X: {long}\n"));
        assert!(f[0].1.len() <= MAX_VALUE);
    }
}
