//! The template dialects of the inject API (KumoMTA's `template_dialect`): `Jinja` (minijinja,
//! the default), `Static` (no expansion at all) and `Handlebars`. One interface for
//! `message`: add a named template, render it for one recipient within the size limit.
//!
//! Values go into headers and text parts as given; into the parts named `html` and `amp`
//! HTML-escaped when asked (`escape_html`).

use minijinja::{Environment, UndefinedBehavior};
use serde::Deserialize;
use serde_json::{Map, Value};
use std::collections::HashMap;

/// Instructions one Jinja render may execute: far beyond what a newsletter needs (a few
/// hundred; a loop over a thousand items some ten thousand), small enough that a hostile
/// template cannot hold a thread for long.
pub const RENDER_FUEL: u64 = 1_000_000;

/// `template_dialect` of an inject request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub enum Dialect {
    /// Jinja (minijinja), the default.
    #[default]
    Jinja,
    /// No expansion: `{{ name }}` stays as written.
    Static,
    /// Handlebars (`{{name}}`, `{{#each}}`, `{{#if}}`).
    Handlebars,
}

/// The compiled templates of one request.
pub(crate) struct Templates {
    inner: Inner,
    max_size: usize,
}

enum Inner {
    Jinja(Box<Environment<'static>>),
    Static(HashMap<String, String>),
    /// Plain templates, and the HTML ones (escaping) apart: Handlebars escapes per registry.
    Handlebars(Box<[handlebars::Handlebars<'static>; 2]>),
}

/// Names of the templates that are HTML.
fn is_html(name: &str) -> bool {
    matches!(name, "html" | "amp")
}

/// Collects rendered output up to a limit, then refuses more: a template cannot build a
/// message larger than the size limit in memory before it is refused.
struct Capped {
    out: Vec<u8>,
    limit: usize,
    /// Whether a write was refused: the render failed for its size, not its template.
    overflowed: bool,
}

impl Capped {
    fn new(limit: usize) -> Capped {
        Capped {
            out: Vec::new(),
            limit,
            overflowed: false,
        }
    }
}

impl std::io::Write for Capped {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.out.len() + buf.len() > self.limit {
            self.overflowed = true;
            return Err(std::io::Error::other(format!(
                "the rendered message exceeds the limit of {} bytes",
                self.limit
            )));
        }
        self.out.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Templates {
    pub(crate) fn new(dialect: Dialect, escape_html: bool, max_size: usize) -> Templates {
        let inner = match dialect {
            Dialect::Jinja => {
                let mut env = Environment::new();
                env.set_fuel(Some(RENDER_FUEL));
                env.set_undefined_behavior(UndefinedBehavior::Lenient);
                env.set_auto_escape_callback(move |name| {
                    if escape_html && is_html(name) {
                        minijinja::AutoEscape::Html
                    } else {
                        minijinja::AutoEscape::None
                    }
                });
                env.set_keep_trailing_newline(true);
                Inner::Jinja(Box::new(env))
            }
            Dialect::Static => Inner::Static(HashMap::new()),
            Dialect::Handlebars => {
                let mut plain = handlebars::Handlebars::new();
                plain.register_escape_fn(handlebars::no_escape);
                let mut html = handlebars::Handlebars::new();
                if !escape_html {
                    html.register_escape_fn(handlebars::no_escape);
                }
                Inner::Handlebars(Box::new([plain, html]))
            }
        };
        Templates { inner, max_size }
    }

    /// Compiles `source` as template `name`; the error is the compiler's message.
    pub(crate) fn add(&mut self, name: String, source: String) -> Result<(), String> {
        match &mut self.inner {
            Inner::Jinja(env) => env
                .add_template_owned(name, source)
                .map_err(|e| e.to_string()),
            Inner::Static(map) => {
                map.insert(name, source);
                Ok(())
            }
            Inner::Handlebars(registries) => {
                let registry = &mut registries[usize::from(is_html(&name))];
                registry
                    .register_template_string(&name, source)
                    .map_err(|e| e.to_string())
            }
        }
    }

    /// Renders template `name` with `ctx`, within the fuel and size limits.
    pub(crate) fn render(&self, name: &str, ctx: &Map<String, Value>) -> Result<Vec<u8>, String> {
        let too_large = || {
            format!(
                "the rendered message exceeds the limit of {} bytes",
                self.max_size
            )
        };
        let mut out = Capped::new(self.max_size);
        let rendered = match &self.inner {
            Inner::Jinja(env) => env
                .get_template(name)
                .and_then(|t| t.render_captured_to(ctx, &mut out).map(drop))
                .map_err(|e| e.to_string()),
            Inner::Static(map) => {
                let source = map.get(name).map(String::as_bytes).unwrap_or_default();
                std::io::Write::write_all(&mut out, source).map_err(|e| e.to_string())
            }
            Inner::Handlebars(registries) => registries[usize::from(is_html(name))]
                .render_to_write(name, ctx, &mut out)
                .map_err(|e| e.to_string()),
        };
        match rendered {
            Ok(()) => Ok(out.out),
            Err(_) if out.overflowed => Err(too_large()),
            Err(e) => Err(format!("template error: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> Map<String, Value> {
        serde_json::json!({"name": "Ann <b>", "items": ["x", "y"]})
            .as_object()
            .cloned()
            .unwrap()
    }

    fn render(dialect: Dialect, name: &str, source: &str) -> String {
        let mut t = Templates::new(dialect, true, 1 << 20);
        t.add(name.to_owned(), source.to_owned()).unwrap();
        String::from_utf8(t.render(name, &ctx()).unwrap()).unwrap()
    }

    #[test]
    fn each_dialect_expands_as_its_users_expect() {
        assert_eq!(
            render(Dialect::Jinja, "text", "Hi {{ name }}"),
            "Hi Ann <b>"
        );
        assert_eq!(
            render(Dialect::Static, "text", "Hi {{ name }}"),
            "Hi {{ name }}"
        );
        assert_eq!(
            render(Dialect::Handlebars, "text", "Hi {{name}}"),
            "Hi Ann <b>"
        );
        assert_eq!(
            render(
                Dialect::Handlebars,
                "text",
                "{{#each items}}[{{this}}]{{/each}}"
            ),
            "[x][y]"
        );
        // HTML parts escape substituted values, in both expanding dialects.
        assert_eq!(
            render(Dialect::Jinja, "html", "<p>{{ name }}</p>"),
            "<p>Ann &lt;b&gt;</p>"
        );
        assert_eq!(
            render(Dialect::Handlebars, "html", "<p>{{name}}</p>"),
            "<p>Ann &lt;b&gt;</p>"
        );
        assert_eq!(
            render(Dialect::Static, "html", "<p>{{ name }}</p>"),
            "<p>{{ name }}</p>"
        );
    }

    #[test]
    fn syntax_errors_and_the_size_limit() {
        let mut t = Templates::new(Dialect::Handlebars, true, 10);
        assert!(t.add("text".into(), "{{#each items}}".into()).is_err());
        t.add("big".into(), "{{#each items}}0123456789{{/each}}".into())
            .unwrap();
        let err = t.render("big", &ctx()).unwrap_err();
        assert!(err.contains("exceeds the limit"), "{err}");
        let mut s = Templates::new(Dialect::Static, true, 4);
        s.add("text".into(), "12345".into()).unwrap();
        assert!(s.render("text", &ctx()).is_err());
    }
}
