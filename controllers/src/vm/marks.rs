//! The marks a managed domain carries: one `<metadata>` element in the
//! agent's XML namespace. They are how domains are adopted after an agent
//! restart (never defined twice), how orphans are found, how a changed spec
//! is noticed, and which disk files the agent may delete.

use super::xml::{Element, escape};

/// The namespace of the metadata element (libvirt keys custom metadata by
/// namespace URI).
pub const NAMESPACE: &str = "https://persys.io/xmlns/vm/v1";

/// The prefix the element is written with.
pub const PREFIX: &str = "persys";

/// What a managed domain records about its workload.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Marks {
    pub workload_id: String,
    /// The agent scope: an agent adopts, watches and collects only domains
    /// of its own scope, so agents (or parallel test runs) sharing a
    /// libvirtd leave each other alone.
    pub scope: String,
    pub revision: String,
    /// Hash of the workload spec the domain was defined from; a different
    /// hash means the domain must be replaced.
    pub spec_hash: String,
    pub generation: i64,
    /// Disk files the agent created (and so removes with the workload).
    pub created_disks: Vec<String>,
    /// The cloud-init seed ISO, if one is attached.
    pub seed: Option<String>,
}

impl Marks {
    /// True when these are the marks of workload `id` in `scope`.
    pub fn is(&self, id: &str, scope: &str) -> bool {
        self.workload_id == id && self.scope == scope
    }

    /// The `<persys:workload>` element, to put inside `<metadata>`.
    pub fn to_xml(&self, indent: &str) -> String {
        self.element(
            indent,
            &format!("{PREFIX}:"),
            &format!(" xmlns:{PREFIX}=\"{NAMESPACE}\""),
        )
    }

    /// The element without prefix or namespace, as `virDomainSetMetadata`
    /// takes it (libvirt puts it in [`NAMESPACE`] under [`PREFIX`]): how the
    /// marks are added to a domain the agent did not define.
    pub fn to_bare_xml(&self) -> String {
        self.element("", "", "")
    }

    fn element(&self, indent: &str, prefix: &str, namespace: &str) -> String {
        let mut out = format!("{indent}<{prefix}workload{namespace}>\n");
        let mut field = |name: &str, value: &str| {
            out.push_str(&format!(
                "{indent}  <{prefix}{name}>{}</{prefix}{name}>\n",
                escape(value)
            ));
        };
        field("managed", "true");
        field("workload-id", &self.workload_id);
        field("scope", &self.scope);
        field("revision", &self.revision);
        field("spec-hash", &self.spec_hash);
        field("generation", &self.generation.to_string());
        for disk in &self.created_disks {
            field("created-disk", disk);
        }
        if let Some(seed) = &self.seed {
            field("seed", seed);
        }
        out.push_str(&format!("{indent}</{prefix}workload>\n"));
        out
    }

    /// Reads the element back (as `virDomainGetMetadata` returns it, or
    /// inside a whole domain description). None unless it is a managed
    /// domain's element with a workload id.
    pub fn parse(xml: &str) -> Option<Marks> {
        let root = Element::parse(xml)?;
        let element = if root.name == "workload" {
            &root
        } else {
            root.child("metadata")?.child("workload")?
        };
        if element.child_text("managed") != Some("true") {
            return None;
        }
        let text = |name: &str| element.child_text(name).unwrap_or("").to_string();
        let workload_id = text("workload-id");
        if workload_id.is_empty() {
            return None;
        }
        Some(Marks {
            workload_id,
            scope: text("scope"),
            revision: text("revision"),
            spec_hash: text("spec-hash"),
            generation: text("generation").parse().unwrap_or(0),
            created_disks: element
                .children_named("created-disk")
                .map(|c| c.text.trim().to_string())
                .filter(|d| !d.is_empty())
                .collect(),
            seed: element
                .child_text("seed")
                .filter(|s| !s.is_empty())
                .map(String::from),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Marks {
        Marks {
            workload_id: "web-1".into(),
            scope: "default".into(),
            revision: "r<1>&\"2\"".into(),
            spec_hash: "abc123".into(),
            generation: 7,
            created_disks: vec!["/var/lib/libvirt/images/a b.qcow2".into()],
            seed: Some("/state/vm/web-1/seed.iso".into()),
        }
    }

    #[test]
    fn marks_survive_a_round_trip_through_their_element() {
        let marks = sample();
        assert_eq!(Marks::parse(&marks.to_xml("")), Some(marks));
    }

    #[test]
    fn bare_marks_read_back_the_same() {
        let marks = sample();
        let bare = marks.to_bare_xml();
        assert!(!bare.contains("persys:"), "{bare}");
        assert_eq!(Marks::parse(&bare), Some(marks));
    }

    #[test]
    fn marks_are_found_in_a_whole_domain_description_without_prefixes() {
        // What libvirt's GetMetadata returns: the element, prefix dropped.
        let bare = r#"<workload><managed>true</managed><workload-id>w</workload-id>
            <scope>s</scope><generation>x</generation></workload>"#;
        let marks = Marks::parse(bare).unwrap();
        assert!(marks.is("w", "s"));
        assert_eq!(marks.generation, 0);
        let domain = format!(
            "<domain type='kvm'><name>w</name><metadata>{}</metadata></domain>",
            sample().to_xml("  ")
        );
        assert_eq!(Marks::parse(&domain), Some(sample()));
    }

    #[test]
    fn elements_that_are_not_persys_marks_are_ignored() {
        assert_eq!(
            Marks::parse("<workload><workload-id>w</workload-id></workload>"),
            None
        );
        assert_eq!(
            Marks::parse("<workload><managed>true</managed></workload>"),
            None
        );
        assert_eq!(Marks::parse("<domain><name>x</name></domain>"), None);
        assert_eq!(Marks::parse("not xml"), None);
    }
}
