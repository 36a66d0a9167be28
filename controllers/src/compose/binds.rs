//! The bind mounts of a compose file, held to the container rule at every
//! `up`, not only at apply.
//!
//! At apply the API server judged each bind source of the interpolated
//! file (`super::policy`), but the filesystem changes afterwards: a
//! directory swapped for a symbolic link would be mounted, wherever it
//! leads, at the next `up`. So before every `up` (the first, every repair
//! and every restart the agent makes; services run with the engine's
//! restart policy `no`, so there is no start the agent does not make), each
//! bind source is resolved afresh and walked without following links
//! ([`crate::docker::binds::resolve_source`], the rule containers follow),
//! and the agent's override file repeats each bind volume with its
//! resolved source: compose merges a service's `volumes` by target, so the
//! engine receives the resolved path, never the file's string.
//!
//! Volumes the local driver binds (`driver_opts.device` with `o: bind`) are
//! checked the same way; they are not rewritten, since an existing volume's
//! options are fixed when it is made.
//!
//! The residual window is the container rule's: compose and the engine
//! resolve the path once more when they mount it, after this check.

use std::path::PathBuf;

use serde_yaml_ng::{Mapping, Value};

use super::policy::{entries, items, text, untagged};
use crate::docker::HostPathPolicy;
use crate::docker::binds::{BindViolation, resolve_source};

/// One `volumes` entry of a service that binds a host path.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ServiceBind {
    /// The service whose `volumes` it is in.
    pub(crate) service: String,
    /// What a refusal names: `services.<name>.volumes[i]`, with `.source`
    /// in the long syntax.
    pub(crate) key: String,
    /// The host path as the interpolated file writes it.
    pub(crate) source: String,
    /// The entry, repeated in the override with the source resolved.
    pub(crate) entry: Entry,
}

/// How a bind volume is written, to write it back the same way (v1 reads
/// only the short syntax in `2.x` files).
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Entry {
    /// `source:rest`, `rest` being `target[:mode]`.
    Short { rest: String },
    /// The long syntax's mapping.
    Long(Mapping),
}

/// Every host path a project's containers mount, from the interpolated
/// compose file.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Binds {
    pub(crate) services: Vec<ServiceBind>,
    /// `(volumes.<name>.driver_opts.device, the device)` of volumes the
    /// local driver binds.
    pub(crate) devices: Vec<(String, String)>,
}

/// A bind volume with its source resolved: what the override says.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Resolved {
    pub(crate) service: String,
    pub(crate) source: PathBuf,
    pub(crate) entry: Entry,
}

impl Resolved {
    /// The `volumes` entry of the override: the file's own, with the
    /// resolved source. Compose interpolates the override too, so every
    /// `$` is written `$$`.
    pub(crate) fn entry(&self) -> Value {
        let source = escape(&self.source.display().to_string());
        match &self.entry {
            Entry::Short { rest } => Value::from(format!("{source}:{}", escape(rest))),
            Entry::Long(long) => {
                let mut long = Value::Mapping(long.clone());
                escape_all(&mut long);
                long["source"] = Value::from(source);
                long
            }
        }
    }
}

fn escape(text: &str) -> String {
    text.replace('$', "$$")
}

/// Every string escaped, and tags (`!override`…) dropped: the override
/// is written as JSON.
fn escape_all(value: &mut Value) {
    match value {
        Value::String(text) => *text = escape(text),
        Value::Sequence(items) => items.iter_mut().for_each(escape_all),
        Value::Mapping(mapping) => mapping.values_mut().for_each(escape_all),
        Value::Tagged(tagged) => {
            let mut inner = std::mem::take(&mut tagged.value);
            escape_all(&mut inner);
            *value = inner;
        }
        _ => {}
    }
}

/// The host path of one service `volumes` entry at `key`, if it binds one:
/// `(the key naming the source, the source, the entry)`. In the short
/// syntax a source starting with `/`, `.` or `~` is a host path (as
/// compose reads it); anything else names a volume.
pub(crate) fn service_bind(key: &str, volume: &Value) -> Option<(String, String, Entry)> {
    match untagged(volume) {
        Value::String(short) => {
            let (source, rest) = short.split_once(':')?;
            source.starts_with(['/', '.', '~']).then(|| {
                (
                    key.to_string(),
                    source.to_string(),
                    Entry::Short {
                        rest: rest.to_string(),
                    },
                )
            })
        }
        Value::Mapping(long) if long.get("type").and_then(text) == Some("bind") => {
            let source = long.get("source").and_then(text)?;
            Some((
                format!("{key}.source"),
                source.to_string(),
                Entry::Long(long.clone()),
            ))
        }
        _ => None,
    }
}

/// The device a top-level volume's local driver binds, if it binds one:
/// `driver_opts.device` with type `none` or an `o` holding `bind`.
pub(crate) fn device_bind(volume: &Value) -> Option<&str> {
    let options = &untagged(volume)["driver_opts"];
    let device = text(&options["device"])?;
    let kind = text(&options["type"]).unwrap_or("none");
    let binds =
        kind == "none" || text(&options["o"]).is_some_and(|o| o.split(',').any(|o| o == "bind"));
    binds.then_some(device)
}

/// Every bind of an interpolated compose file.
pub(crate) fn binds_of(document: &Value) -> Binds {
    let mut binds = Binds::default();
    for (name, service) in entries(&document["services"]) {
        let volumes = untagged(service)
            .get("volumes")
            .map(items)
            .unwrap_or_default();
        for (index, volume) in volumes.into_iter().enumerate() {
            let key = format!("services.{name}.volumes[{index}]");
            if let Some((key, source, entry)) = service_bind(&key, volume) {
                binds.services.push(ServiceBind {
                    service: name.clone(),
                    key,
                    source,
                    entry,
                });
            }
        }
    }
    for (name, volume) in entries(&document["volumes"]) {
        if let Some(device) = device_bind(volume) {
            let key = format!("volumes.{name}.driver_opts.device");
            binds.devices.push((key, device.to_string()));
        }
    }
    binds
}

/// Resolves and checks every bind of the project as the container rule
/// does; the first that may not be mounted now is the violation, named by
/// its key in the file. Filesystem work: run it on a blocking thread.
pub(crate) fn resolve(
    binds: &Binds,
    policy: &HostPathPolicy,
) -> Result<Vec<Resolved>, BindViolation> {
    let violation = |key: &str| {
        let what = key.to_string();
        move |message| BindViolation { what, message }
    };
    for (key, device) in &binds.devices {
        resolve_source(policy, device).map_err(violation(key))?;
    }
    binds
        .services
        .iter()
        .map(|bind| {
            let source = resolve_source(policy, &bind.source).map_err(violation(&bind.key))?;
            Ok(Resolved {
                service: bind.service.clone(),
                source,
                entry: bind.entry.clone(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn document(yaml: &str) -> Value {
        super::super::document::load(yaml).unwrap()
    }

    #[test]
    fn binds_are_read_in_both_syntaxes_and_named_volumes_are_not_binds() {
        let found = binds_of(&document(
            "services:\n  web:\n    image: x\n    volumes:\n      - data:/data\n      - /srv/a:/a:ro\n      - /anonymous\n      - type: bind\n        source: /srv/b\n        target: /b\n        read_only: true\n      - type: volume\n        source: v\n        target: /v\n      - ./rel:/rel\nvolumes:\n  data: {}\n  dev:\n    driver_opts: {type: none, o: bind, device: /srv/c}\n  nfs:\n    driver_opts: {type: nfs, o: 'addr=1.2.3.4', device: ':/x'}\n",
        ));
        let keys: Vec<(&str, &str)> = found
            .services
            .iter()
            .map(|b| (b.key.as_str(), b.source.as_str()))
            .collect();
        assert_eq!(
            keys,
            [
                ("services.web.volumes[1]", "/srv/a"),
                ("services.web.volumes[3].source", "/srv/b"),
                ("services.web.volumes[5]", "./rel"),
            ]
        );
        assert_eq!(
            found.devices,
            [(
                "volumes.dev.driver_opts.device".to_string(),
                "/srv/c".to_string()
            )]
        );
    }

    use crate::docker::binds::test_root as setup;

    #[test]
    fn the_override_gets_resolved_sources_written_as_the_file_wrote_them() {
        let (_dir, root, policy) = setup();
        std::os::unix::fs::symlink(root.join("data"), root.join("current")).unwrap();
        let yaml = format!(
            "services:\n  web:\n    image: x\n    volumes:\n      - {root}/current:/a:ro\n      - type: bind\n        source: {root}/./current\n        target: /b\n        read_only: true\n",
            root = root.display()
        );
        let resolved = resolve(&binds_of(&document(&yaml)), &policy).unwrap();
        let data = root.join("data").display().to_string();
        assert_eq!(resolved[0].entry(), Value::from(format!("{data}:/a:ro")));
        let long = resolved[1].entry();
        assert_eq!(long["source"], Value::from(data.as_str()));
        assert_eq!(long["target"], Value::from("/b"));
        assert_eq!(long["read_only"], Value::from(true));
        let dollar = Resolved {
            service: "web".into(),
            source: PathBuf::from("/srv/a$b"),
            entry: Entry::Short {
                rest: "/c$d:ro".into(),
            },
        };
        assert_eq!(dollar.entry(), Value::from("/srv/a$$b:/c$$d:ro"));
    }

    #[test]
    fn a_source_swapped_for_a_link_out_of_the_root_is_a_violation_naming_the_key() {
        let (_dir, root, policy) = setup();
        let yaml = format!(
            "services:\n  web:\n    image: x\n    volumes: ['{}:/data']\n",
            root.join("data").display()
        );
        let binds = binds_of(&document(&yaml));
        resolve(&binds, &policy).unwrap();
        std::fs::remove_dir(root.join("data")).unwrap();
        std::os::unix::fs::symlink(root.parent().unwrap().join("outside"), root.join("data"))
            .unwrap();
        let violation = resolve(&binds, &policy).unwrap_err();
        assert_eq!(violation.what, "services.web.volumes[0]");
        assert!(
            violation.message.contains("host_paths.allowed_roots"),
            "{violation}"
        );
        let relative = binds_of(&document(
            "services:\n  web:\n    image: x\n    volumes: ['./data:/data']\n",
        ));
        let violation = resolve(&relative, &policy).unwrap_err();
        assert!(
            violation.message.contains("not an absolute path"),
            "{violation}"
        );
    }
}
