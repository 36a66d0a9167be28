//! Just enough XML for domain descriptions: escaping what the agent writes,
//! and a forgiving tokenizer for what libvirt hands back (`dumpxml`, the
//! metadata element). Hand-built, so the crate needs no XML dependency.

/// Escapes text for an element body or a quoted attribute value. Characters
/// XML 1.0 forbids (most C0 controls) become U+FFFD: libvirt would refuse
/// the document otherwise.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\t' | '\n' | '\r' => out.push(c),
            c if (c as u32) < 0x20 || c == '\u{FFFE}' || c == '\u{FFFF}' => out.push('\u{FFFD}'),
            c => out.push(c),
        }
    }
    out
}

/// Resolves the five predefined entities and numeric character references.
pub fn unescape(text: &str) -> String {
    if !text.contains('&') {
        return text.to_string();
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(amp) = rest.find('&') {
        out.push_str(&rest[..amp]);
        rest = &rest[amp..];
        let Some(semi) = rest.find(';') else {
            break;
        };
        let entity = &rest[1..semi];
        let decoded = match entity {
            "amp" => Some('&'),
            "lt" => Some('<'),
            "gt" => Some('>'),
            "quot" => Some('"'),
            "apos" => Some('\''),
            _ => entity
                .strip_prefix("#x")
                .and_then(|hex| u32::from_str_radix(hex, 16).ok())
                .or_else(|| entity.strip_prefix('#').and_then(|d| d.parse().ok()))
                .and_then(char::from_u32),
        };
        match decoded {
            Some(c) => {
                out.push(c);
                rest = &rest[semi + 1..];
            }
            None => {
                out.push('&');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// One piece of a document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Token {
    /// `<name a='1'>` (or `<name/>`, followed by an `End`).
    Start {
        /// Local name, without a namespace prefix.
        name: String,
        attributes: Vec<(String, String)>,
    },
    End {
        name: String,
    },
    /// Character data between tags, unescaped; whitespace-only text is
    /// dropped.
    Text(String),
}

/// The name without its namespace prefix: `persys:id` → `id`.
fn local(name: &str) -> &str {
    name.rsplit(':').next().unwrap_or(name)
}

/// Tokenizes a well-formed document (comments, processing instructions and
/// declarations are skipped). Malformed input ends the token list early
/// rather than failing: everything read from libvirt is well-formed.
pub fn tokens(xml: &str) -> Vec<Token> {
    let mut out = Vec::new();
    let mut rest = xml;
    while !rest.is_empty() {
        let Some(lt) = rest.find('<') else {
            push_text(&mut out, rest);
            break;
        };
        push_text(&mut out, &rest[..lt]);
        rest = &rest[lt..];
        if let Some(after) = rest.strip_prefix("<!--") {
            rest = after.find("-->").map(|i| &after[i + 3..]).unwrap_or("");
            continue;
        }
        if let Some(after) = rest.strip_prefix("<![CDATA[") {
            let end = after.find("]]>").unwrap_or(after.len());
            out.push(Token::Text(after[..end].to_string()));
            rest = after.get(end + 3..).unwrap_or("");
            continue;
        }
        let Some(gt) = tag_end(rest) else {
            break;
        };
        let tag = &rest[1..gt];
        rest = &rest[gt + 1..];
        if tag.starts_with('?') || tag.starts_with('!') {
            continue;
        }
        if let Some(name) = tag.strip_prefix('/') {
            out.push(Token::End {
                name: local(name.trim()).to_string(),
            });
            continue;
        }
        let (body, empty) = match tag.strip_suffix('/') {
            Some(body) => (body, true),
            None => (tag, false),
        };
        let body = body.trim();
        let name_end = body.find(char::is_whitespace).unwrap_or(body.len());
        let name = local(&body[..name_end]).to_string();
        let attributes = attributes(&body[name_end..]);
        out.push(Token::Start {
            name: name.clone(),
            attributes,
        });
        if empty {
            out.push(Token::End { name });
        }
    }
    out
}

fn push_text(out: &mut Vec<Token>, text: &str) {
    if !text.trim().is_empty() {
        out.push(Token::Text(unescape(text)));
    }
}

/// The index of the `>` closing the tag that starts `rest`, skipping any
/// inside quoted attribute values.
fn tag_end(rest: &str) -> Option<usize> {
    let mut quote = None;
    for (i, c) in rest.char_indices().skip(1) {
        match (quote, c) {
            (None, '"' | '\'') => quote = Some(c),
            (Some(q), c) if c == q => quote = None,
            (None, '>') => return Some(i),
            _ => {}
        }
    }
    None
}

fn attributes(mut text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    loop {
        text = text.trim_start();
        let Some(eq) = text.find('=') else {
            return out;
        };
        let name = local(text[..eq].trim()).to_string();
        let value = text[eq + 1..].trim_start();
        let Some(quote) = value.chars().next().filter(|c| *c == '"' || *c == '\'') else {
            return out;
        };
        let Some(end) = value[1..].find(quote) else {
            return out;
        };
        out.push((name, unescape(&value[1..1 + end])));
        text = &value[end + 2..];
    }
}

/// An element read back from a document: name, attributes, its own text
/// and its children.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Element {
    pub name: String,
    pub attributes: Vec<(String, String)>,
    pub text: String,
    pub children: Vec<Element>,
}

impl Element {
    /// Parses the first element of a document into a tree.
    pub fn parse(xml: &str) -> Option<Element> {
        let mut stack: Vec<Element> = Vec::new();
        for token in tokens(xml) {
            match token {
                Token::Start { name, attributes } => stack.push(Element {
                    name,
                    attributes,
                    ..Default::default()
                }),
                Token::Text(text) => {
                    if let Some(top) = stack.last_mut() {
                        top.text.push_str(&text);
                    }
                }
                Token::End { .. } => {
                    let done = stack.pop()?;
                    match stack.last_mut() {
                        Some(parent) => parent.children.push(done),
                        None => return Some(done),
                    }
                }
            }
        }
        None
    }

    pub fn attribute(&self, name: &str) -> Option<&str> {
        self.attributes
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn child(&self, name: &str) -> Option<&Element> {
        self.children.iter().find(|c| c.name == name)
    }

    pub fn children_named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Element> + 'a {
        self.children.iter().filter(move |c| c.name == name)
    }

    /// The trimmed text of the child `name`, if there is one.
    pub fn child_text(&self, name: &str) -> Option<&str> {
        self.child(name).map(|c| c.text.trim())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_covers_markup_quotes_and_forbidden_controls() {
        assert_eq!(
            escape(r#"a&b<c>"d"'e'"#),
            "a&amp;b&lt;c&gt;&quot;d&quot;&apos;e&apos;"
        );
        assert_eq!(escape("x\u{1}y\tz"), "x\u{FFFD}y\tz");
        assert_eq!(unescape(&escape(r#"<&>"' ünï"#)), r#"<&>"' ünï"#);
        assert_eq!(unescape("&#65;&#x42;&unknown;&"), "AB&unknown;&");
    }

    #[test]
    fn elements_are_read_with_or_without_namespace_prefixes() {
        let doc = r#"<?xml version="1.0"?>
            <!-- a comment -->
            <persys:workload xmlns:persys="https://persys.io/xmlns/vm/v1">
              <persys:workload-id>a&amp;b</persys:workload-id>
              <created-disk>/x</created-disk>
              <created-disk>/y</created-disk>
              <empty/>
              <disk type='file' device="cdrom"><source file='/a b/c&apos;.iso'/></disk>
            </persys:workload>"#;
        let root = Element::parse(doc).unwrap();
        assert_eq!(root.name, "workload");
        assert_eq!(root.child_text("workload-id"), Some("a&b"));
        let disks: Vec<_> = root
            .children_named("created-disk")
            .map(|c| c.text.as_str())
            .collect();
        assert_eq!(disks, ["/x", "/y"]);
        assert!(root.child("empty").is_some());
        let disk = root.child("disk").unwrap();
        assert_eq!(disk.attribute("device"), Some("cdrom"));
        assert_eq!(
            disk.child("source").unwrap().attribute("file"),
            Some("/a b/c'.iso")
        );
    }

    #[test]
    fn a_gt_inside_an_attribute_value_does_not_end_the_tag() {
        let root = Element::parse("<a title='1 > 0'><b/></a>").unwrap();
        assert_eq!(root.attribute("title"), Some("1 > 0"));
        assert_eq!(root.children.len(), 1);
    }
}
