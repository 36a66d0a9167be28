//! Manifests: what `apply -f` reads.
//!
//! A manifest is `{id, type, revision_id?, desired_state?, spec}`, where
//! `spec` is the original agent's JSON spec of that type; a compose spec may
//! name its compose file (`compose_file`, relative to the manifest) instead
//! of carrying it. A file holds one manifest, a YAML multi-document stream,
//! a YAML list, or a JSON array.
//!
//! Parsing takes two passes over the text. The first reads each document
//! into a generic value, only to learn its `type`; the second deserializes it
//! straight from the text into the spec type it names, so that every error
//! keeps its line and column. The second pass records each key no field
//! took: a typo must not be silently ignored.
//!
//! Before either pass the text is held to [`persys_api::yaml::MANIFEST`]:
//! at most 4 MiB is read, and a YAML text whose aliases expand past 100,000
//! nodes or that nests deeper than 64 levels is refused without being
//! built, so a billion-laughs file costs milliseconds, not gigabytes. A
//! `compose_file` is read up to the agent's 1 MiB limit.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use base64::Engine;
use persys_api::v1::{
    ApplyWorkloadRequest, ComposeSpec, ContainerSpec, DesiredState, ServiceProbes, VmSpec,
    WorkloadSpec, WorkloadType, workload_spec,
};
use persys_api::yaml;
use serde::Deserialize;
use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, SeqAccess, Visitor};

use crate::error::CliError;

/// A manifest ready to send.
#[derive(Debug)]
pub struct Manifest {
    pub request: ApplyWorkloadRequest,
}

/// Where the text came from: its name in messages, and the directory that
/// a relative `compose_file` is read from.
struct Source {
    name: String,
    dir: PathBuf,
}

/// Reads at most `bounds.max_bytes` of `reader` as text; a longer input is
/// refused naming `name` and the limit.
fn read_bounded(reader: impl Read, name: &str, bounds: &yaml::Bounds) -> Result<String, String> {
    let mut bytes = Vec::new();
    reader
        .take(bounds.max_bytes as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("reading {name}: {e}"))?;
    if bytes.len() > bounds.max_bytes {
        return Err(format!(
            "{name}: is refused: it is over the {}-byte limit for a {}",
            bounds.max_bytes, bounds.what
        ));
    }
    String::from_utf8(bytes).map_err(|e| format!("reading {name}: not UTF-8 text: {e}"))
}

/// Reads every manifest of a file, or of standard input for `-`.
pub fn read(path: &Path) -> Result<Vec<Manifest>, CliError> {
    let (text, source) = if path == Path::new("-") {
        let text = read_bounded(std::io::stdin(), "<stdin>", &yaml::MANIFEST)
            .map_err(CliError::Manifest)?;
        let source = Source {
            name: "<stdin>".into(),
            dir: PathBuf::from("."),
        };
        (text, source)
    } else {
        let file = std::fs::File::open(path)
            .map_err(|e| CliError::Manifest(format!("reading {}: {e}", path.display())))?;
        let text = read_bounded(file, &path.display().to_string(), &yaml::MANIFEST)
            .map_err(CliError::Manifest)?;
        let source = Source {
            name: path.display().to_string(),
            dir: path
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."))
                .to_path_buf(),
        };
        (text, source)
    };
    let json_file = path.extension().is_some_and(|e| e == "json");
    parse_text(&text, &source, json_file)
}

/// Every manifest of `text`, read from `source` (JSON when `json_file`
/// or when the text starts as JSON does).
fn parse_text(text: &str, source: &Source, json_file: bool) -> Result<Vec<Manifest>, CliError> {
    let is_json = json_file || text.trim_start().starts_with(['{', '[']);
    let documents = if is_json {
        // JSON has no aliases, and serde_json bounds its nesting.
        parse_json(text, source)?
    } else {
        // Bad YAML is left to the parse below, which names line and column.
        if let Err(error) = yaml::check(text, &yaml::MANIFEST)
            && error.is_bound()
        {
            return Err(CliError::Manifest(format!("{}: {error}", source.name)));
        }
        parse_yaml(text, source)?
    };
    if documents.is_empty() {
        return Err(CliError::Manifest(format!(
            "{}: no manifest in it",
            source.name
        )));
    }
    documents
        .into_iter()
        .map(|parsed| parsed.into_manifest(source))
        .collect()
}

/// A workload type as a manifest spells it.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Kind {
    Container,
    Compose,
    Vm,
}

impl Kind {
    fn from_name(name: &str) -> Option<Kind> {
        match name {
            "container" => Some(Kind::Container),
            "compose" => Some(Kind::Compose),
            "vm" => Some(Kind::Vm),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Desired {
    Running,
    Stopped,
}

/// One manifest, its spec of type `S`.
#[derive(Debug, Deserialize)]
struct Document<S> {
    id: String,
    #[serde(rename = "type")]
    #[allow(dead_code)] // read to check it; the spec type already says it
    kind: Kind,
    #[serde(default)]
    revision_id: String,
    #[serde(default)]
    desired_state: Option<Desired>,
    spec: S,
}

/// The compose spec as a manifest may write it: the compose file inline
/// (`compose_yaml`, base64 or plain YAML) or by path (`compose_file`),
/// and probes per service (`probes: {web: {readiness_probe: …}}`).
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct ComposeManifestSpec {
    project_name: String,
    compose_yaml: String,
    compose_file: Option<PathBuf>,
    env: BTreeMap<String, String>,
    probes: BTreeMap<String, ServiceProbes>,
}

/// The second pass's result for one manifest.
enum Typed {
    // Boxed: a container spec with its probes outweighs the others.
    Container(Box<Document<ContainerSpec>>),
    Compose(Document<ComposeManifestSpec>),
    Vm(Document<VmSpec>),
}

/// A parsed manifest, where it was, and the keys no field took.
struct Parsed {
    /// "document 2", "item 3", or empty for a file of one manifest.
    position: String,
    typed: Typed,
    unknown: Vec<String>,
}

/// Deserializes one manifest into the spec type the first pass found,
/// recording the paths of the keys it ignores.
struct ManifestSeed<'a> {
    kind: Option<Kind>,
    unknown: &'a mut Vec<String>,
}

impl<'de> DeserializeSeed<'de> for ManifestSeed<'_> {
    type Value = Typed;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Typed, D::Error> {
        let ManifestSeed { kind, unknown } = self;
        // `?` marks an optional field's value (a probe): not a key to show.
        let mut record =
            |path: serde_ignored::Path| unknown.push(path.to_string().replace(".?", ""));
        let deserializer = serde_ignored::Deserializer::new(deserializer, &mut record);
        Ok(match kind {
            Some(Kind::Container) => {
                Typed::Container(Box::new(Document::deserialize(deserializer)?))
            }
            Some(Kind::Compose) => Typed::Compose(Document::deserialize(deserializer)?),
            Some(Kind::Vm) => Typed::Vm(Document::deserialize(deserializer)?),
            // No usable type: this fails on `type`, at its line and column.
            None => {
                Document::<IgnoredAny>::deserialize(deserializer)?;
                return Err(serde::de::Error::custom(
                    "type: must be one of container, compose, vm",
                ));
            }
        })
    }
}

/// Deserializes a list of manifests, each with its own spec type.
struct ManifestListSeed<'a> {
    kinds: &'a [Option<Kind>],
    unknown: &'a mut Vec<Vec<String>>,
}

impl<'de> DeserializeSeed<'de> for ManifestListSeed<'_> {
    type Value = Vec<Typed>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Vec<Typed>, D::Error> {
        deserializer.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for ManifestListSeed<'_> {
    type Value = Vec<Typed>;

    fn expecting(&self, formatter: &mut std::fmt::Formatter) -> std::fmt::Result {
        formatter.write_str("a list of manifests")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<Typed>, A::Error> {
        let mut manifests = Vec::new();
        loop {
            let index = manifests.len();
            if self.unknown.len() <= index {
                self.unknown.push(Vec::new());
            }
            let seed = ManifestSeed {
                kind: self.kinds.get(index).copied().flatten(),
                unknown: &mut self.unknown[index],
            };
            match seq.next_element_seed(seed)? {
                Some(typed) => manifests.push(typed),
                None => return Ok(manifests),
            }
        }
    }
}

/// What the first pass learns of a document.
enum Shape {
    Empty,
    One(Option<Kind>),
    Many(Vec<Option<Kind>>),
    Other,
}

fn shape_of_yaml(value: &serde_yaml_ng::Value) -> Shape {
    use serde_yaml_ng::Value;
    let kind = |v: &Value| {
        v.get("type")
            .and_then(Value::as_str)
            .and_then(Kind::from_name)
    };
    match value {
        Value::Null => Shape::Empty,
        Value::Mapping(_) => Shape::One(kind(value)),
        Value::Sequence(items) => Shape::Many(items.iter().map(kind).collect()),
        _ => Shape::Other,
    }
}

fn shape_of_json(value: &serde_json::Value) -> Shape {
    use serde_json::Value;
    let kind = |v: &Value| {
        v.get("type")
            .and_then(Value::as_str)
            .and_then(Kind::from_name)
    };
    match value {
        Value::Object(_) => Shape::One(kind(value)),
        Value::Array(items) => Shape::Many(items.iter().map(kind).collect()),
        _ => Shape::Other,
    }
}

const NOT_A_MANIFEST: &str =
    "expected a manifest (a mapping with id, type and spec) or a list of them";

/// "FILE:LINE:COLUMN: message", the location taken out of the message.
fn located(source: &Source, line: usize, column: usize, message: String) -> CliError {
    let message = message.replacen(&format!(" at line {line} column {column}"), "", 1);
    CliError::Manifest(format!("{}:{line}:{column}: {message}", source.name))
}

fn yaml_error(source: &Source, error: serde_yaml_ng::Error) -> CliError {
    match error.location() {
        Some(at) => located(source, at.line(), at.column(), error.to_string()),
        None => CliError::Manifest(format!("{}: {error}", source.name)),
    }
}

fn json_error(source: &Source, error: serde_json::Error) -> CliError {
    if error.line() == 0 {
        return CliError::Manifest(format!("{}: {error}", source.name));
    }
    located(source, error.line(), error.column(), error.to_string())
}

fn parse_yaml(text: &str, source: &Source) -> Result<Vec<Parsed>, CliError> {
    let mut shapes = Vec::new();
    for document in serde_yaml_ng::Deserializer::from_str(text) {
        let value =
            serde_yaml_ng::Value::deserialize(document).map_err(|e| yaml_error(source, e))?;
        shapes.push(shape_of_yaml(&value));
    }
    let several = shapes.len() > 1;
    let mut parsed = Vec::new();
    let documents = serde_yaml_ng::Deserializer::from_str(text);
    for (index, (document, shape)) in documents.zip(&shapes).enumerate() {
        let position = if several {
            format!("document {}", index + 1)
        } else {
            String::new()
        };
        match shape {
            Shape::Empty => {}
            Shape::Other => {
                return Err(CliError::Manifest(if several {
                    format!("{}: {position}: {NOT_A_MANIFEST}", source.name)
                } else {
                    format!("{}: {NOT_A_MANIFEST}", source.name)
                }));
            }
            Shape::One(kind) => {
                let mut unknown = Vec::new();
                let seed = ManifestSeed {
                    kind: *kind,
                    unknown: &mut unknown,
                };
                let typed = seed
                    .deserialize(document)
                    .map_err(|e| yaml_error(source, e))?;
                parsed.push(Parsed {
                    position,
                    typed,
                    unknown,
                });
            }
            Shape::Many(kinds) => {
                let mut unknown = Vec::new();
                let seed = ManifestListSeed {
                    kinds,
                    unknown: &mut unknown,
                };
                let list = seed
                    .deserialize(document)
                    .map_err(|e| yaml_error(source, e))?;
                parsed.extend(list_items(&position, list, unknown));
            }
        }
    }
    Ok(parsed)
}

fn parse_json(text: &str, source: &Source) -> Result<Vec<Parsed>, CliError> {
    let value: serde_json::Value = serde_json::from_str(text).map_err(|e| json_error(source, e))?;
    let mut deserializer = serde_json::Deserializer::from_str(text);
    let parsed = match shape_of_json(&value) {
        Shape::One(kind) => {
            let mut unknown = Vec::new();
            let seed = ManifestSeed {
                kind,
                unknown: &mut unknown,
            };
            let typed = seed
                .deserialize(&mut deserializer)
                .map_err(|e| json_error(source, e))?;
            vec![Parsed {
                position: String::new(),
                typed,
                unknown,
            }]
        }
        Shape::Many(kinds) => {
            let mut unknown = Vec::new();
            let seed = ManifestListSeed {
                kinds: &kinds,
                unknown: &mut unknown,
            };
            let list = seed
                .deserialize(&mut deserializer)
                .map_err(|e| json_error(source, e))?;
            list_items("", list, unknown)
        }
        Shape::Empty | Shape::Other => {
            return Err(CliError::Manifest(format!(
                "{}: {NOT_A_MANIFEST}",
                source.name
            )));
        }
    };
    deserializer.end().map_err(|e| json_error(source, e))?;
    Ok(parsed)
}

fn list_items(document: &str, list: Vec<Typed>, unknown: Vec<Vec<String>>) -> Vec<Parsed> {
    let mut unknown = unknown.into_iter();
    list.into_iter()
        .enumerate()
        .map(|(index, typed)| {
            let item = format!("item {}", index + 1);
            Parsed {
                position: if document.is_empty() {
                    item
                } else {
                    format!("{document}, {item}")
                },
                typed,
                unknown: unknown.next().unwrap_or_default(),
            }
        })
        .collect()
}

impl Parsed {
    fn id(&self) -> &str {
        match &self.typed {
            Typed::Container(d) => &d.id,
            Typed::Compose(d) => &d.id,
            Typed::Vm(d) => &d.id,
        }
    }

    /// "file: document 2: web", what a message about this manifest starts with.
    fn context(&self, source: &Source) -> String {
        let mut text = source.name.clone();
        for part in [self.position.as_str(), self.id()] {
            if !part.is_empty() {
                text.push_str(": ");
                text.push_str(part);
            }
        }
        text
    }

    fn into_manifest(self, source: &Source) -> Result<Manifest, CliError> {
        let context = self.context(source);
        if !self.unknown.is_empty() {
            let (noun, list) = match self.unknown.as_slice() {
                [one] => ("field", one.clone()),
                many => ("fields", many.join(", ")),
            };
            return Err(CliError::Manifest(format!(
                "{context}: unknown {noun} {list}"
            )));
        }
        let request = match self.typed {
            Typed::Container(d) => request(*d, WorkloadType::Container, |s| {
                Ok(workload_spec::Spec::Container(s))
            }),
            Typed::Vm(d) => request(d, WorkloadType::Vm, |s| Ok(workload_spec::Spec::Vm(s))),
            Typed::Compose(d) => request(d, WorkloadType::Compose, |s| compose_spec(&s, source)),
        }
        .map_err(|e| CliError::Manifest(format!("{context}: {e}")))?;
        Ok(Manifest { request })
    }
}

fn request<S>(
    document: Document<S>,
    kind: WorkloadType,
    spec: impl FnOnce(S) -> Result<workload_spec::Spec, String>,
) -> Result<ApplyWorkloadRequest, String> {
    let desired = match document.desired_state {
        None | Some(Desired::Running) => DesiredState::Running,
        Some(Desired::Stopped) => DesiredState::Stopped,
    };
    Ok(ApplyWorkloadRequest {
        id: document.id,
        r#type: kind as i32,
        revision_id: document.revision_id,
        desired_state: desired as i32,
        spec: Some(WorkloadSpec {
            spec: Some(spec(document.spec)?),
        }),
    })
}

/// The compose spec to send: the compose file read and base64-encoded
/// when the manifest names it.
fn compose_spec(
    spec: &ComposeManifestSpec,
    source: &Source,
) -> Result<workload_spec::Spec, String> {
    let compose_yaml = match (&spec.compose_file, spec.compose_yaml.is_empty()) {
        (Some(_), false) => {
            return Err("spec: give compose_file or compose_yaml, not both".into());
        }
        (None, true) => return Err("spec: compose_file or compose_yaml is required".into()),
        (None, false) => spec.compose_yaml.clone(),
        (Some(file), true) => {
            let path = source.dir.join(file);
            let name = path.display().to_string();
            let text = std::fs::File::open(&path)
                .map_err(|e| format!("reading {name}: {e}"))
                .and_then(|file| read_bounded(file, &name, &yaml::COMPOSE_FILE))
                .map_err(|why| format!("spec.compose_file: {why}"))?;
            base64::engine::general_purpose::STANDARD.encode(text)
        }
    };
    Ok(workload_spec::Spec::Compose(ComposeSpec {
        project_name: spec.project_name.clone(),
        compose_yaml,
        env: spec.env.clone(),
        probes: spec
            .probes
            .iter()
            .map(|(service, probes)| (service.clone(), probes.clone()))
            .collect(),
    }))
}

#[cfg(test)]
mod proptests;

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Vec<Manifest>, CliError> {
        let dir = std::env::temp_dir();
        let path = dir.join(format!("persysctl-manifest-{}.yaml", fastrand::u64(..)));
        std::fs::write(&path, text).unwrap();
        let result = read(&path);
        std::fs::remove_file(&path).unwrap();
        result
    }

    fn billion_laughs() -> String {
        persys_test_support::billion_laughs(
            "x-",
            "id: web\ntype: container\nspec:\n  image: nginx\n  args: *i\n",
        )
    }

    #[test]
    fn an_alias_bomb_size_and_depth_are_refused_naming_the_file_and_the_bound() {
        let error = parse(&billion_laughs()).unwrap_err().to_string();
        assert!(error.contains("persysctl-manifest-"), "{error}");
        assert!(
            error.contains("limit for a manifest")
                || error.contains("in a manifest (an alias bomb)"),
            "{error}"
        );
        let big = format!(
            "id: web\ntype: container\nspec: {{image: nginx}}\n# {}\n",
            "x".repeat(4 << 20)
        );
        let error = parse(&big).unwrap_err().to_string();
        assert!(
            error.contains("over the 4194304-byte limit for a manifest"),
            "{error}"
        );
        let deep = format!(
            "id: web\ntype: container\nspec: {{image: nginx}}\nx: {}{}\n",
            "[".repeat(100),
            "]".repeat(100)
        );
        let error = parse(&deep).unwrap_err().to_string();
        assert!(error.contains("deeper than 64 levels"), "{error}");
    }

    fn container(manifest: &Manifest) -> &ContainerSpec {
        match manifest.request.spec.as_ref().and_then(|s| s.spec.as_ref()) {
            Some(workload_spec::Spec::Container(c)) => c,
            other => panic!("not a container spec: {other:?}"),
        }
    }

    #[test]
    fn a_container_manifest_becomes_an_apply_request() {
        let manifests = parse(
            "id: web\ntype: container\nrevision_id: r1\ndesired_state: stopped\n\
             spec:\n  image: nginx:1\n  ports:\n  - host_port: 8080\n    container_port: 80\n",
        )
        .unwrap();
        let request = &manifests[0].request;
        assert_eq!(request.id, "web");
        assert_eq!(request.r#type(), WorkloadType::Container);
        assert_eq!(request.revision_id, "r1");
        assert_eq!(request.desired_state(), DesiredState::Stopped);
        let spec = container(&manifests[0]);
        assert_eq!(spec.image, "nginx:1");
        assert_eq!(spec.ports[0].host_port, 8080);
    }

    #[test]
    fn probes_are_read_with_kubelets_names() {
        let manifests = parse(
            "id: web\ntype: container\nspec:\n  image: nginx\n\
             \x20 readiness_probe:\n    http_get: {path: /healthz, port: 8080}\n    period_seconds: 5\n\
             \x20 liveness_probe:\n    exec: {command: [test, -f, /tmp/ok]}\n    failure_threshold: 2\n",
        )
        .unwrap();
        let spec = container(&manifests[0]);
        let ready = spec.readiness_probe.as_ref().unwrap();
        assert_eq!(ready.http_get.as_ref().unwrap().port, 8080);
        assert_eq!(ready.period_seconds, 5);
        let live = spec.liveness_probe.as_ref().unwrap();
        assert_eq!(
            live.exec.as_ref().unwrap().command,
            ["test", "-f", "/tmp/ok"]
        );
        assert_eq!(live.failure_threshold, 2);

        let manifests = parse(
            "id: app\ntype: compose\nspec:\n  compose_yaml: \"services: {web: {image: nginx}}\"\n\
             \x20 probes:\n    web:\n      readiness_probe:\n        tcp_socket: {port: 80}\n",
        )
        .unwrap();
        let Some(workload_spec::Spec::Compose(compose)) = manifests[0]
            .request
            .spec
            .as_ref()
            .and_then(|s| s.spec.clone())
        else {
            panic!("not a compose spec")
        };
        let probe = compose.probes["web"].readiness_probe.as_ref().unwrap();
        assert_eq!(probe.tcp_socket.as_ref().unwrap().port, 80);

        let error = parse(
            "id: web\ntype: container\nspec:\n  image: nginx\n  readiness_probe: {http_get: {prot: 1}}\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            error.contains("spec.readiness_probe.http_get.prot"),
            "{error}"
        );
    }

    #[test]
    fn desired_state_defaults_to_running() {
        let manifests = parse("id: web\ntype: container\nspec: {image: nginx}\n").unwrap();
        assert_eq!(manifests[0].request.desired_state(), DesiredState::Running);
    }

    #[test]
    fn a_yaml_list_holds_several_manifests_of_different_types() {
        let manifests = parse(
            "- {id: a, type: container, spec: {image: nginx}}\n\
             - {id: b, type: vm, spec: {vcpus: 2, memory_mb: 512}}\n",
        )
        .unwrap();
        assert_eq!(manifests.len(), 2);
        assert_eq!(manifests[1].request.r#type(), WorkloadType::Vm);
    }

    #[test]
    fn unknown_keys_are_named_with_their_path() {
        let error = parse(
            "id: web\ntype: container\nrevison_id: r1\nspec:\n  imagee: nginx\n  ports:\n  - hostport: 1\n",
        )
        .unwrap_err()
        .to_string();
        assert!(error.contains("unknown fields"), "{error}");
        assert!(error.contains("revison_id"), "{error}");
        assert!(error.contains("spec.imagee"), "{error}");
        assert!(error.contains("spec.ports.0.hostport"), "{error}");
        assert!(error.contains(": web: "), "{error}");
    }

    #[test]
    fn a_wrong_type_of_value_is_located() {
        let error = parse("id: vm1\ntype: vm\nspec:\n  vcpus: many\n")
            .unwrap_err()
            .to_string();
        assert!(error.contains(".yaml:4:10: "), "{error}");
        assert!(error.contains("spec.vcpus"), "{error}");
        assert!(!error.contains(" at line "), "{error}");
    }

    #[test]
    fn a_missing_or_unknown_type_is_located() {
        let error = parse("id: web\ntype: docker-thing\nspec: {}\n")
            .unwrap_err()
            .to_string();
        assert!(error.contains(".yaml:2:"), "{error}");
        assert!(error.contains("docker-thing"), "{error}");
        let error = parse("id: web\nspec: {}\n").unwrap_err().to_string();
        assert!(error.contains("type"), "{error}");
    }

    #[test]
    fn compose_yaml_and_compose_file_are_exclusive() {
        let error = parse(
            "id: p\ntype: compose\nspec:\n  compose_yaml: 'services: {}'\n  compose_file: c.yaml\n",
        )
        .unwrap_err()
        .to_string();
        assert!(error.contains("not both"), "{error}");
    }

    #[test]
    fn an_empty_file_is_an_error() {
        let error = parse("# nothing\n").unwrap_err().to_string();
        assert!(error.contains("no manifest"), "{error}");
    }
}
