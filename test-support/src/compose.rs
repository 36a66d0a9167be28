//! Random compose files for property tests, each with the verdict the
//! node's default policy (every switch closed) must reach on it: which
//! keys it must refuse, by the path a refusal names.
//!
//! A file is a few services, each an image and a few entries drawn from
//! [`SERVICE_ENTRIES`], and a few top-level entries from [`TOP_ENTRIES`].
//! An entry the default policy refuses carries the path its refusal
//! names, relative to its service (`privileged`) or from the top
//! (`networks.n.driver`).

use proptest::prelude::*;

/// A key of a service or of the file, its value (flow YAML), and the path
/// a refusal names when the default policy refuses it.
#[derive(Debug, Clone, Copy)]
pub struct Entry {
    pub key: &'static str,
    pub yaml: &'static str,
    pub refused: Option<&'static str>,
}

const fn ok(key: &'static str, yaml: &'static str) -> Entry {
    Entry {
        key,
        yaml,
        refused: None,
    }
}

const fn no(key: &'static str, yaml: &'static str, path: &'static str) -> Entry {
    Entry {
        key,
        yaml,
        refused: Some(path),
    }
}

/// Service keys, allowed and refused by the default policy.
pub const SERVICE_ENTRIES: &[Entry] = &[
    ok("privileged", "false"),
    ok("privileged", "'false'"),
    no("privileged", "true", "privileged"),
    no("privileged", "'yes'", "privileged"),
    no("<<", "*base", "privileged"),
    ok("network_mode", "bridge"),
    ok("network_mode", "none"),
    no("network_mode", "host", "network_mode"),
    no("network_mode", "'container:db'", "network_mode"),
    no("pid", "host", "pid"),
    ok("ipc", "shareable"),
    no("ipc", "host", "ipc"),
    no("userns_mode", "host", "userns_mode"),
    no("uts", "host", "uts"),
    no("cap_add", "[CHOWN]", "cap_add"),
    no("cap_add", "[ALL]", "cap_add"),
    ok("cap_drop", "[ALL]"),
    ok("security_opt", "[no-new-privileges]"),
    ok("security_opt", "['no-new-privileges:true']"),
    no("security_opt", "['seccomp:unconfined']", "security_opt"),
    ok("devices", "[]"),
    no("devices", "['/dev/fuse:/dev/fuse']", "devices"),
    no("gpus", "all", "gpus"),
    no(
        "deploy",
        "{resources: {reservations: {devices: [{capabilities: [gpu]}]}}}",
        "deploy.resources.reservations.devices",
    ),
    ok("deploy", "{resources: {limits: {memory: 64M}}}"),
    ok("sysctls", "{net.ipv4.tcp_syncookies: 1}"),
    no("sysctls", "['net.ipv4.ip_forward=1']", "sysctls"),
    ok("labels", "[app=web]"),
    no("labels", "{persys.workload-id: x}", "labels"),
    no("provider", "{type: model}", "provider"),
    ok("volumes", "['data:/data']"),
    ok("volumes", "['/var/lib/persys/volumes/data:/data']"),
    no("volumes", "['/etc:/host-etc']", "volumes[0]"),
    no(
        "volumes",
        "['/var/run/docker.sock:/var/run/docker.sock']",
        "volumes[0]",
    ),
    no(
        "volumes",
        "[{type: bind, source: /, target: /host}]",
        "volumes[0]",
    ),
    no("volumes_from", "['container:db']", "volumes_from[0]"),
    no("external_links", "[db]", "external_links"),
    no("env_file", "[/etc/passwd]", "env_file[0]"),
    no("build", ".", "build"),
    no("cgroup_parent", "x", "cgroup_parent"),
    ok("cgroup", "private"),
    no("cgroup", "host", "cgroup"),
    no(
        "extends",
        "{file: /etc/other.yml, service: x}",
        "extends.file",
    ),
    ok("environment", "{A: '$$HOME', B: 'x y'}"),
    no(
        "environment",
        "['C=${PERSYS_PROPTEST_UNSET:?needed}']",
        "environment[0]",
    ),
    ok("command", "[sh, -c, 'echo $$HOME']"),
    ok("ports", "['8080:80']"),
    ok("restart", "always"),
];

/// Top-level keys (`x-base` is always written: services merge it).
pub const TOP_ENTRIES: &[Entry] = &[
    ok("networks", "{n: {}}"),
    no("networks", "{n: {driver: host}}", "networks.n.driver"),
    no("networks", "{n: {external: true}}", "networks.n"),
    ok("volumes", "{v: {}}"),
    no("volumes", "{v: {external: true}}", "volumes.v"),
    no("secrets", "{s: {file: /etc/shadow}}", "secrets.s.file"),
    no("configs", "{c: {external: true}}", "configs.c"),
    no("include", "[/etc/other.yml]", "include[0]"),
    ok("x-extra", "{a: 1}"),
];

/// Service names.
const SERVICES: &[&str] = &["web", "db", "a-b", "x_1"];

/// A compose file and what the default policy must say of it.
#[derive(Debug, Clone)]
pub struct ComposeFile {
    pub text: String,
    /// The paths refusals may name (`services.web.privileged`); empty: the
    /// default policy accepts the file.
    pub refused: Vec<String>,
}

/// Entries with distinct keys (a YAML mapping holds a key once).
fn distinct(entries: Vec<Entry>) -> Vec<Entry> {
    let mut seen = Vec::new();
    entries
        .into_iter()
        .filter(|e| {
            let new = !seen.contains(&e.key);
            seen.push(e.key);
            new
        })
        .collect()
}

fn entries(pool: &'static [Entry], max: usize) -> impl Strategy<Value = Vec<Entry>> {
    prop::collection::vec(prop::sample::select(pool), 0..=max).prop_map(distinct)
}

/// A compose file of 1 to 3 services.
pub fn compose_file() -> impl Strategy<Value = ComposeFile> {
    (
        prop::sample::subsequence(SERVICES, 1..=3),
        prop::collection::vec(entries(SERVICE_ENTRIES, 4), 3),
        entries(TOP_ENTRIES, 2),
    )
        .prop_map(|(names, services, top)| {
            let mut text = String::from("x-base: &base {privileged: true}\nservices:\n");
            let mut refused = Vec::new();
            for (name, entries) in names.iter().zip(services) {
                text.push_str(&format!("  {name}:\n    image: busybox\n"));
                // A key written in the service wins over the merged one.
                let own_privileged = entries.iter().any(|e| e.key == "privileged");
                for entry in entries {
                    text.push_str(&format!("    {}: {}\n", entry.key, entry.yaml));
                    if entry.key == "<<" && own_privileged {
                        continue;
                    }
                    if let Some(path) = entry.refused {
                        refused.push(format!("services.{name}.{path}"));
                    }
                }
            }
            for entry in top {
                text.push_str(&format!("{}: {}\n", entry.key, entry.yaml));
                if let Some(path) = entry.refused {
                    refused.push(path.to_string());
                }
            }
            ComposeFile { text, refused }
        })
}

/// YAML syntax, for [`crate::mutate::edits`] of a compose file or manifest.
pub const YAML_SYNTAX: &[&str] = &[
    ":",
    ": ",
    "- ",
    "\n",
    "\n  ",
    "  ",
    "{",
    "}",
    "[",
    "]",
    ",",
    "'",
    "\"",
    "#",
    "&a ",
    "*a",
    "*base",
    "<<: ",
    "!!binary ",
    "!override ",
    "!reset ",
    "~",
    "|\n",
    ">-\n",
    "? ",
    "---\n",
    "...\n",
    "%YAML 1.2\n",
    "\t",
    "$",
    "${",
    "${A:-",
    "}",
    "$$",
    "\\",
    "null",
    "true",
    "0x",
    "1e999",
    "-",
    ".",
    "/",
    "..",
    "host",
    "services",
    "volumes",
    "image",
    "privileged",
];
