//! Image references and pull policies: what to ask the engine for, and when.

use std::fmt;

/// The registry an image without a domain comes from.
pub const DEFAULT_REGISTRY: &str = "docker.io";

/// A parsed `[domain[:port]/]path[:tag][@digest]` reference, checked against
/// the grammar of the distribution project (which the engine applies too).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageReference {
    /// `registry.example.com:5000`; none for Docker Hub.
    pub domain: Option<String>,
    /// `team/app`.
    pub path: String,
    pub tag: Option<String>,
    /// `sha256:…`.
    pub digest: Option<String>,
}

impl ImageReference {
    pub fn parse(reference: &str) -> Result<ImageReference, String> {
        if reference.is_empty() {
            return Err("an image is required".into());
        }
        if reference.len() > 512 {
            return Err("is longer than 512 characters".into());
        }
        if reference
            .chars()
            .any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(format!("{reference:?} contains whitespace"));
        }
        let (rest, digest) = match reference.split_once('@') {
            Some((rest, digest)) => {
                check_digest(digest).map_err(|e| format!("{reference:?}: {e}"))?;
                (rest, Some(digest.to_string()))
            }
            None => (reference, None),
        };
        let last_slash = rest.rfind('/').map(|i| i + 1).unwrap_or(0);
        let (name, tag) = match rest[last_slash..].rfind(':') {
            Some(i) => {
                let at = last_slash + i;
                (&rest[..at], Some(rest[at + 1..].to_string()))
            }
            None => (rest, None),
        };
        if let Some(tag) = &tag {
            check_tag(tag).map_err(|e| format!("{reference:?}: {e}"))?;
        }
        if name.len() > 255 {
            return Err(format!(
                "{reference:?}: the name is longer than 255 characters"
            ));
        }
        let (domain, path) = match name.split_once('/') {
            Some((first, remainder))
                if first.contains(['.', ':'])
                    || first == "localhost"
                    || first.chars().any(|c| c.is_ascii_uppercase()) =>
            {
                check_domain(first).map_err(|e| format!("{reference:?}: {e}"))?;
                (Some(first.to_string()), remainder)
            }
            _ => (None, name),
        };
        for component in path.split('/') {
            check_path_component(component).map_err(|e| format!("{reference:?}: {e}"))?;
        }
        Ok(ImageReference {
            domain,
            path: path.to_string(),
            tag,
            digest,
        })
    }

    /// The registry to authenticate against.
    pub fn registry(&self) -> &str {
        self.domain.as_deref().unwrap_or(DEFAULT_REGISTRY)
    }

    /// The repository, with its domain when it has one.
    pub fn repository(&self) -> String {
        match &self.domain {
            Some(domain) => format!("{domain}/{}", self.path),
            None => self.path.clone(),
        }
    }

    /// The `fromImage` and `tag` of a pull. An empty tag would make the
    /// engine pull every tag, so it defaults to `latest`; a digest wins.
    pub fn pull_target(&self) -> (String, String) {
        let tag = self
            .digest
            .clone()
            .or_else(|| self.tag.clone())
            .unwrap_or_else(|| "latest".to_string());
        (self.repository(), tag)
    }
}

impl fmt::Display for ImageReference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.repository())?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

/// `[a-z0-9]+` joined by `.`, `_`, `__` or runs of `-`.
fn check_path_component(component: &str) -> Result<(), String> {
    if component.is_empty() {
        return Err("has an empty path component".into());
    }
    let bytes = component.as_bytes();
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    if !alnum(bytes[0]) || !alnum(bytes[bytes.len() - 1]) {
        return Err(format!(
            "path component {component:?} must start and end with a lower-case letter or digit"
        ));
    }
    let mut i = 0;
    while i < bytes.len() {
        if alnum(bytes[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < bytes.len() && !alnum(bytes[i]) {
            i += 1;
        }
        let separator = &component[start..i];
        let valid = separator == "."
            || separator == "_"
            || separator == "__"
            || separator.bytes().all(|b| b == b'-');
        if !valid {
            return Err(format!(
                "path component {component:?} may only hold lower-case letters, digits and separators (., _, __, -)"
            ));
        }
    }
    Ok(())
}

/// `host[:port]`, host being DNS labels or an IPv6 literal in brackets.
fn check_domain(domain: &str) -> Result<(), String> {
    let (host, port) = if let Some(rest) = domain.strip_prefix('[') {
        let (v6, after) = rest
            .split_once(']')
            .ok_or_else(|| format!("domain {domain:?} has an unclosed '['"))?;
        if v6.is_empty() || !v6.chars().all(|c| c.is_ascii_hexdigit() || c == ':') {
            return Err(format!("domain {domain:?} is not an IPv6 literal"));
        }
        (None, after.strip_prefix(':'))
    } else {
        match domain.rsplit_once(':') {
            Some((host, port)) => (Some(host), Some(port)),
            None => (Some(domain), None),
        }
    };
    if let Some(port) = port
        && (port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) || port.len() > 5)
    {
        return Err(format!("domain {domain:?} has an invalid port"));
    }
    if let Some(host) = host {
        for label in host.split('.') {
            let bytes = label.as_bytes();
            let ok = !bytes.is_empty()
                && bytes[0].is_ascii_alphanumeric()
                && bytes[bytes.len() - 1].is_ascii_alphanumeric()
                && bytes
                    .iter()
                    .all(|b| b.is_ascii_alphanumeric() || *b == b'-');
            if !ok {
                return Err(format!("domain {domain:?} is not a host name"));
            }
        }
    }
    Ok(())
}

/// `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`.
fn check_tag(tag: &str) -> Result<(), String> {
    let bytes = tag.as_bytes();
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let ok = !bytes.is_empty()
        && bytes.len() <= 128
        && word(bytes[0])
        && bytes.iter().all(|b| word(*b) || *b == b'.' || *b == b'-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "tag {tag:?} must be 1-128 letters, digits, '_', '.' or '-', not starting with '.' or '-'"
        ))
    }
}

/// `algorithm:hex`, the hex at least 32 digits.
fn check_digest(digest: &str) -> Result<(), String> {
    let (algorithm, hex) = digest
        .split_once(':')
        .ok_or_else(|| format!("digest {digest:?} must be algorithm:hex"))?;
    let algorithm_ok = algorithm
        .bytes()
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic())
        && algorithm
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'.' | b'_' | b'-'));
    let hex_ok = hex.len() >= 32 && hex.bytes().all(|b| b.is_ascii_hexdigit());
    if algorithm_ok && hex_ok {
        Ok(())
    } else {
        Err(format!("digest {digest:?} must be algorithm:hex"))
    }
}

/// When the image is pulled before a container is created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PullPolicy {
    /// Pull only when the engine does not have the image (the default).
    IfNotPresent,
    /// Pull before every create; a failed pull fails the create.
    Always,
    /// Never pull: the image must already be on the node.
    Never,
}

impl PullPolicy {
    /// `IfNotPresent` (or empty), `Always` or `Never`, in any case.
    pub fn parse(policy: &str) -> Option<PullPolicy> {
        match policy.to_ascii_lowercase().as_str() {
            "" | "ifnotpresent" => Some(PullPolicy::IfNotPresent),
            "always" => Some(PullPolicy::Always),
            "never" => Some(PullPolicy::Never),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_split_into_domain_path_tag_and_digest() {
        let r = ImageReference::parse("busybox").unwrap();
        assert_eq!(r.domain, None);
        assert_eq!(r.registry(), "docker.io");
        assert_eq!(r.pull_target(), ("busybox".into(), "latest".into()));

        let r = ImageReference::parse("persys-test/busybox:latest").unwrap();
        assert_eq!(r.domain, None);
        assert_eq!(r.path, "persys-test/busybox");
        assert_eq!(r.tag.as_deref(), Some("latest"));

        let r = ImageReference::parse("localhost:5000/app:v1.2").unwrap();
        assert_eq!(r.domain.as_deref(), Some("localhost:5000"));
        assert_eq!(r.registry(), "localhost:5000");
        assert_eq!(
            r.pull_target(),
            ("localhost:5000/app".into(), "v1.2".into())
        );

        let digest = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
        let r = ImageReference::parse(&format!("registry.invalid/a/b:1@{digest}")).unwrap();
        assert_eq!(
            r.pull_target(),
            ("registry.invalid/a/b".into(), digest.into())
        );
        assert_eq!(r.to_string(), format!("registry.invalid/a/b:1@{digest}"));

        let r = ImageReference::parse("[::1]:5000/app").unwrap();
        assert_eq!(r.domain.as_deref(), Some("[::1]:5000"));
    }

    #[test]
    fn malformed_references_are_refused() {
        for bad in [
            "",
            "Busybox",
            "busy box",
            "busybox:",
            "busybox:-x",
            "a//b",
            "/a",
            "a/",
            "a..b",
            "a@sha256:xyz",
            "registry.invalid:port/a",
            "-a",
            "a-",
        ] {
            assert!(
                ImageReference::parse(bad).is_err(),
                "{bad:?} should be refused"
            );
        }
    }

    #[test]
    fn pull_policies_parse_in_any_case() {
        assert_eq!(PullPolicy::parse(""), Some(PullPolicy::IfNotPresent));
        assert_eq!(PullPolicy::parse("Always"), Some(PullPolicy::Always));
        assert_eq!(PullPolicy::parse("never"), Some(PullPolicy::Never));
        assert_eq!(PullPolicy::parse("sometimes"), None);
    }
}
