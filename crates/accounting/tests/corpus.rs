//! Classifies every line of `corpus.tsv` with the default rules and fails listing every
//! mismatch, so a rule change shows all it breaks at once.

use accounting::{BounceCategory, Classifier, ReplyFacts};

const CORPUS: &str = include_str!("corpus.tsv");

struct Case<'a> {
    line: usize,
    code: u16,
    enhanced: Option<&'a str>,
    domain: Option<&'a str>,
    mx_hosts: Vec<String>,
    want: BounceCategory,
    text: &'a str,
}

fn dash(field: &str) -> Option<&str> {
    (field != "-").then_some(field)
}

fn category(name: &str) -> BounceCategory {
    BounceCategory::ALL
        .into_iter()
        .find(|c| c.as_str() == name)
        .unwrap_or_else(|| panic!("unknown category {name:?} in corpus.tsv"))
}

fn cases() -> Vec<Case<'static>> {
    CORPUS
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|(i, l)| {
            let f: Vec<&str> = l.splitn(6, '\t').collect();
            assert_eq!(f.len(), 6, "corpus.tsv line {}: {l:?}", i + 1);
            Case {
                line: i + 1,
                code: f[0]
                    .parse()
                    .unwrap_or_else(|_| panic!("corpus.tsv line {}: bad code", i + 1)),
                enhanced: dash(f[1]),
                domain: dash(f[2]),
                mx_hosts: dash(f[3])
                    .map(|m| m.split(',').map(str::to_owned).collect())
                    .unwrap_or_default(),
                want: category(f[4]),
                text: f[5],
            }
        })
        .collect()
}

#[test]
fn the_default_rules_classify_the_corpus() {
    let cases = cases();
    assert!(cases.len() >= 150, "only {} cases", cases.len());
    let classifier = Classifier::default();
    let mut mismatches = Vec::new();
    for case in &cases {
        let got = classifier.classify(&ReplyFacts {
            code: case.code,
            enhanced: case.enhanced,
            text: case.text,
            domain: case.domain,
            mx_hosts: &case.mx_hosts,
        });
        if got != case.want {
            mismatches.push(format!(
                "line {}: {} {} -> {} (want {}): {}",
                case.line,
                case.code,
                case.enhanced.unwrap_or("-"),
                got.as_str(),
                case.want.as_str(),
                case.text
            ));
        }
    }
    for m in &mismatches {
        println!("{m}");
    }
    assert!(
        mismatches.is_empty(),
        "{} of {} corpus lines misclassified:\n{}",
        mismatches.len(),
        cases.len(),
        mismatches.join("\n")
    );
}

#[test]
fn the_corpus_covers_every_category_the_rules_can_give() {
    let cases = cases();
    for category in BounceCategory::ALL {
        // Expiry is the engine's verdict, never a reply's.
        if category != BounceCategory::MessageExpired {
            assert!(
                cases.iter().any(|c| c.want == category),
                "no corpus line expects {}",
                category.as_str()
            );
        }
    }
}
