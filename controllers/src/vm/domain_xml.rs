//! A workload's VM spec as libvirt domain XML: the plan (everything
//! resolved and checked) and its rendering. Every text and attribute goes
//! through [`escape`].

use std::fmt::Write;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use persys_api::v1::{NetworkConfig, VmSpec};
use sha2::{Digest, Sha256};

use super::disks::{DiskKind, DiskPlan};
use super::errors::SpecError;
use super::graphics::Password;
use super::marks::Marks;
use super::xml::escape;

/// `network` values that ask for qemu's user-mode networking (no host
/// setup; what tests and hosts without dnsmasq use).
pub const USER_NETWORK: &str = "user";

/// Where a network interface is plugged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NicSource {
    /// A libvirt-managed network, by name.
    Network(String),
    /// A host bridge (`/sys/class/net/<name>/bridge` exists).
    Bridge(String),
    /// qemu user-mode networking.
    User,
}

/// One network interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NicPlan {
    pub source: NicSource,
    /// Given, or derived from the workload id so it stays the same across
    /// redefinitions (and so does a DHCP lease).
    pub mac: String,
    /// A static IPv4 address, given to the guest by a DHCP host entry on a
    /// libvirt-managed network.
    pub ip: Option<Ipv4Addr>,
}

/// Graphics, always bound to 127.0.0.1 (reach it through an SSH tunnel)
/// and behind a generated password (kept in `<state>/vm/<id>/graphics-password`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Graphics {
    Vnc,
    Spice,
}

/// Everything a domain is defined from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainPlan {
    pub name: String,
    /// The UUID to keep when redefining an existing domain.
    pub uuid: Option<String>,
    /// `kvm` or `qemu`.
    pub domain_type: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub disks: Vec<DiskPlan>,
    pub nics: Vec<NicPlan>,
    pub graphics: Option<Graphics>,
    /// The display's password, set when the host is prepared (never part
    /// of the spec, never logged).
    pub graphics_password: Option<Password>,
    /// Where libvirt appends the serial console's output (the VM's logs):
    /// `<state>/vm/<id>/console.log`; none: not captured.
    pub console_log: Option<PathBuf>,
    pub marks: Marks,
}

/// The domain name: `spec.name` when given, else the workload id (both
/// validated as ids by the API server; checked again here).
pub fn domain_name(id: &str, spec: &VmSpec) -> Result<String, SpecError> {
    let name = if spec.name.trim().is_empty() {
        id
    } else {
        spec.name.trim()
    };
    let ok = !name.is_empty()
        && name.len() <= 128
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if !ok {
        return Err(SpecError::new(
            "spec.vm.name",
            format!("{name:?} is not a valid domain name: letters, digits, '_', '.', '-'"),
        ));
    }
    Ok(name.to_string())
}

/// The least memory a guest is given; below it no distribution boots.
pub const MIN_MEMORY_MB: i64 = 64;

/// Checks vCPUs and memory.
pub fn resources(spec: &VmSpec) -> Result<(u32, u64), SpecError> {
    if spec.vcpus < 1 {
        return Err(SpecError::new("spec.vm.vcpus", "must be at least 1"));
    }
    if spec.memory_mb < MIN_MEMORY_MB {
        return Err(SpecError::new(
            "spec.vm.memory_mb",
            format!("must be at least {MIN_MEMORY_MB} (MiB)"),
        ));
    }
    Ok((spec.vcpus as u32, spec.memory_mb as u64))
}

/// Graphics from the spec's metadata (`graphics`: `vnc`, `spice`, `none`).
pub fn graphics(spec: &VmSpec) -> Result<Option<Graphics>, SpecError> {
    match spec
        .metadata
        .get("graphics")
        .map(|g| g.trim().to_ascii_lowercase())
        .as_deref()
    {
        None | Some("") | Some("none") => Ok(None),
        Some("vnc") => Ok(Some(Graphics::Vnc)),
        Some("spice") => Ok(Some(Graphics::Spice)),
        Some(other) => Err(SpecError::new(
            "spec.vm.metadata[\"graphics\"]",
            format!("{other:?} is not one of vnc, spice, none"),
        )),
    }
}

/// Resolves the spec's networks. `sys_class_net` is `/sys/class/net` (a
/// parameter so tests can fake a bridge).
pub fn plan_nics(
    id: &str,
    networks: &[NetworkConfig],
    sys_class_net: &Path,
) -> Result<Vec<NicPlan>, SpecError> {
    let mut nics = Vec::with_capacity(networks.len());
    for (i, network) in networks.iter().enumerate() {
        let field = format!("spec.vm.networks[{i}]");
        let name = network.network.trim();
        let valid_name = !name.is_empty()
            && name.len() <= 64
            && name != "."
            && name != ".."
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-' | ':'));
        if !valid_name {
            return Err(SpecError::new(
                format!("{field}.network"),
                format!(
                    "{name:?} is not a libvirt network name, a host bridge or {USER_NETWORK:?}"
                ),
            ));
        }
        let source = if name == USER_NETWORK {
            NicSource::User
        } else if sys_class_net.join(name).join("bridge").exists() {
            NicSource::Bridge(name.to_string())
        } else {
            NicSource::Network(name.to_string())
        };
        let mac = match network.mac_address.trim() {
            "" => derived_mac(id, i),
            given => parse_mac(given).ok_or_else(|| {
                SpecError::new(
                    format!("{field}.mac_address"),
                    format!("{given:?} is not a unicast MAC address like 52:54:00:12:34:56"),
                )
            })?,
        };
        if nics.iter().any(|n: &NicPlan| n.mac == mac) {
            return Err(SpecError::new(
                format!("{field}.mac_address"),
                format!("{mac} is used twice"),
            ));
        }
        let ip = match network.ip_address.trim() {
            "" => None,
            given => {
                let address = given.split('/').next().unwrap_or(given);
                Some(address.parse::<Ipv4Addr>().map_err(|_| {
                    SpecError::new(
                        format!("{field}.ip_address"),
                        format!("{given:?} is not an IPv4 address"),
                    )
                })?)
            }
        };
        nics.push(NicPlan { source, mac, ip });
    }
    Ok(nics)
}

/// A locally administered unicast MAC in qemu's 52:54:00 range, from the
/// workload id and the interface's position.
fn derived_mac(id: &str, index: usize) -> String {
    let digest = Sha256::digest(format!("{id}/{index}").as_bytes());
    format!(
        "52:54:00:{:02x}:{:02x}:{:02x}",
        digest[0], digest[1], digest[2]
    )
}

fn parse_mac(text: &str) -> Option<String> {
    let parts: Vec<&str> = text.split([':', '-']).collect();
    if parts.len() != 6 {
        return None;
    }
    let mut bytes = [0u8; 6];
    for (byte, part) in bytes.iter_mut().zip(&parts) {
        if part.len() != 2 {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    if bytes[0] & 1 == 1 {
        return None;
    }
    Some(
        bytes
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":"),
    )
}

/// The `<host>` element of a DHCP host entry for `nic` on a libvirt
/// network.
pub fn dhcp_host_xml(nic: &NicPlan, name: &str) -> Option<String> {
    let ip = nic.ip?;
    Some(format!(
        "<host mac='{}' name='{}' ip='{}'/>",
        escape(&nic.mac),
        escape(name),
        ip
    ))
}

impl DomainPlan {
    /// The domain XML.
    pub fn to_xml(&self) -> String {
        let mut x = String::with_capacity(4096);
        // Writing to a String cannot fail.
        let _ = self.write_xml(&mut x);
        x
    }

    fn write_xml(&self, x: &mut String) -> std::fmt::Result {
        writeln!(x, "<domain type='{}'>", escape(&self.domain_type))?;
        writeln!(x, "  <name>{}</name>", escape(&self.name))?;
        if let Some(uuid) = &self.uuid {
            writeln!(x, "  <uuid>{}</uuid>", escape(uuid))?;
        }
        writeln!(
            x,
            "  <description>Managed by persys-agent: workload {} (revision {}). Changes are reverted.</description>",
            escape(&self.marks.workload_id),
            escape(&self.marks.revision)
        )?;
        writeln!(x, "  <metadata>")?;
        x.push_str(&self.marks.to_xml("    "));
        writeln!(x, "  </metadata>")?;
        writeln!(x, "  <memory unit='MiB'>{}</memory>", self.memory_mib)?;
        writeln!(
            x,
            "  <currentMemory unit='MiB'>{}</currentMemory>",
            self.memory_mib
        )?;
        writeln!(x, "  <vcpu placement='static'>{}</vcpu>", self.vcpus)?;
        writeln!(x, "  <os>")?;
        if std::env::consts::ARCH == "x86_64" {
            writeln!(x, "    <type arch='x86_64'>hvm</type>")?;
            // The firmware writes to the serial console too, so a VM's
            // logs start at power-on; with nothing bootable it retries
            // every 10 s instead of halting.
            writeln!(x, "    <bios useserial='yes' rebootTimeout='10000'/>")?;
        } else {
            writeln!(x, "    <type>hvm</type>")?;
        }
        writeln!(x, "  </os>")?;
        writeln!(x, "  <features><acpi/><apic/></features>")?;
        // No <cpu> element: qemu's default model. host-passthrough breaks
        // on nested hosts (KVM refuses MSRs the outer hypervisor hides).
        writeln!(x, "  <clock offset='utc'/>")?;
        // A guest that powers off or crashes stops; the controller decides
        // whether it starts again.
        writeln!(x, "  <on_poweroff>destroy</on_poweroff>")?;
        writeln!(x, "  <on_reboot>restart</on_reboot>")?;
        writeln!(x, "  <on_crash>destroy</on_crash>")?;
        writeln!(x, "  <devices>")?;
        for disk in &self.disks {
            let device = match disk.kind {
                DiskKind::Disk => "disk",
                DiskKind::Cdrom => "cdrom",
            };
            writeln!(x, "    <disk type='file' device='{device}'>")?;
            writeln!(
                x,
                "      <driver name='qemu' type='{}'/>",
                disk.format.driver_type()
            )?;
            writeln!(
                x,
                "      <source file='{}'/>",
                escape(&disk.path.to_string_lossy())
            )?;
            writeln!(
                x,
                "      <target dev='{}' bus='{}'/>",
                escape(&disk.target),
                disk.bus.name()
            )?;
            if let Some(order) = disk.boot_order {
                writeln!(x, "      <boot order='{order}'/>")?;
            }
            if disk.readonly() {
                writeln!(x, "      <readonly/>")?;
            }
            if let Some(serial) = &disk.serial {
                writeln!(x, "      <serial>{}</serial>", escape(serial))?;
            }
            writeln!(x, "    </disk>")?;
        }
        for nic in &self.nics {
            match &nic.source {
                NicSource::Network(name) => {
                    writeln!(x, "    <interface type='network'>")?;
                    writeln!(x, "      <source network='{}'/>", escape(name))?;
                }
                NicSource::Bridge(name) => {
                    writeln!(x, "    <interface type='bridge'>")?;
                    writeln!(x, "      <source bridge='{}'/>", escape(name))?;
                }
                NicSource::User => writeln!(x, "    <interface type='user'>")?,
            }
            writeln!(x, "      <mac address='{}'/>", escape(&nic.mac))?;
            writeln!(x, "      <model type='virtio'/>")?;
            writeln!(x, "    </interface>")?;
        }
        match &self.console_log {
            Some(path) => writeln!(
                x,
                "    <serial type='pty'><log file='{}' append='on'/><target port='0'/></serial>",
                escape(&path.to_string_lossy())
            )?,
            None => writeln!(x, "    <serial type='pty'><target port='0'/></serial>")?,
        }
        writeln!(
            x,
            "    <console type='pty'><target type='serial' port='0'/></console>"
        )?;
        // A display without a password would be open to every local user:
        // the host preparation sets one whenever the spec asks for a display.
        if let (Some(kind), Some(password)) = (self.graphics, &self.graphics_password) {
            let kind = match kind {
                Graphics::Vnc => "vnc",
                Graphics::Spice => "spice",
            };
            writeln!(
                x,
                "    <graphics type='{kind}' autoport='yes' listen='127.0.0.1' passwd='{}'><listen type='address' address='127.0.0.1'/></graphics>",
                escape(password.expose())
            )?;
            writeln!(x, "    <video><model type='virtio'/></video>")?;
        }
        writeln!(
            x,
            "    <memballoon model='virtio'><stats period='10'/></memballoon>"
        )?;
        writeln!(x, "  </devices>")?;
        writeln!(x, "</domain>")
    }
}

#[cfg(test)]
mod proptests;

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::vm::disks::{Bus, DiskFormat};
    use crate::vm::xml::Element;

    fn plan() -> DomainPlan {
        DomainPlan {
            name: "web".into(),
            uuid: None,
            domain_type: "kvm".into(),
            vcpus: 2,
            memory_mib: 512,
            disks: vec![
                DiskPlan {
                    path: PathBuf::from("/var/lib/libvirt/images/it's <web>.qcow2"),
                    format: DiskFormat::Qcow2,
                    kind: DiskKind::Disk,
                    target: "vda".into(),
                    bus: Bus::Virtio,
                    boot_order: Some(1),
                    size_gb: 10,
                    is_seed: false,
                    field: "spec.vm.disks[0]".into(),
                    read_only: false,
                    serial: None,
                },
                DiskPlan {
                    path: PathBuf::from("/state/vm/web/seed.iso"),
                    format: DiskFormat::Iso,
                    kind: DiskKind::Cdrom,
                    target: "sda".into(),
                    bus: Bus::Sata,
                    boot_order: None,
                    size_gb: 0,
                    is_seed: true,
                    field: "seed".into(),
                    read_only: true,
                    serial: None,
                },
            ],
            nics: vec![
                NicPlan {
                    source: NicSource::Network("default".into()),
                    mac: "52:54:00:aa:bb:cc".into(),
                    ip: Some(Ipv4Addr::new(192, 168, 122, 10)),
                },
                NicPlan {
                    source: NicSource::Bridge("br0".into()),
                    mac: "52:54:00:aa:bb:cd".into(),
                    ip: None,
                },
                NicPlan {
                    source: NicSource::User,
                    mac: "52:54:00:aa:bb:ce".into(),
                    ip: None,
                },
            ],
            graphics: Some(Graphics::Vnc),
            graphics_password: Some(Password::new("pa'ss<1>")),
            console_log: Some(PathBuf::from("/state/vm/it's <web>/console.log")),
            marks: Marks {
                workload_id: "web".into(),
                scope: "default".into(),
                revision: "r&1".into(),
                spec_hash: "h".into(),
                generation: 3,
                created_disks: vec!["/var/lib/libvirt/images/it's <web>.qcow2".into()],
                seed: Some("/state/vm/web/seed.iso".into()),
            },
        }
    }

    #[test]
    fn the_domain_xml_says_what_the_plan_says_and_reads_back() {
        let xml = plan().to_xml();
        let domain = Element::parse(&xml).expect("well-formed XML");
        assert_eq!(domain.attribute("type"), Some("kvm"));
        assert_eq!(domain.child_text("name"), Some("web"));
        assert_eq!(domain.child_text("memory"), Some("512"));
        assert_eq!(domain.child_text("vcpu"), Some("2"));
        assert_eq!(Marks::parse(&xml), Some(plan().marks));
        let devices = domain.child("devices").unwrap();
        let disks: Vec<_> = devices.children_named("disk").collect();
        assert_eq!(disks.len(), 2);
        assert_eq!(
            disks[0].child("source").unwrap().attribute("file"),
            Some("/var/lib/libvirt/images/it's <web>.qcow2")
        );
        assert_eq!(
            disks[0].child("boot").unwrap().attribute("order"),
            Some("1")
        );
        assert_eq!(disks[1].attribute("device"), Some("cdrom"));
        assert!(disks[1].child("readonly").is_some());
        assert!(disks[1].child("boot").is_none(), "the seed is never booted");
        let nics: Vec<_> = devices.children_named("interface").collect();
        let kinds: Vec<_> = nics.iter().map(|n| n.attribute("type").unwrap()).collect();
        assert_eq!(kinds, ["network", "bridge", "user"]);
        assert_eq!(
            nics[1].child("source").unwrap().attribute("bridge"),
            Some("br0")
        );
        let graphics = devices.child("graphics").unwrap();
        assert_eq!(graphics.attribute("listen"), Some("127.0.0.1"));
        assert_eq!(graphics.attribute("passwd"), Some("pa'ss<1>"));
        assert!(!format!("{:?}", plan()).contains("pa'ss"), "never in Debug");
        let serial = devices.child("serial").unwrap();
        let log = serial.child("log").expect("the console is captured");
        assert_eq!(
            log.attribute("file"),
            Some("/state/vm/it's <web>/console.log")
        );
        assert_eq!(log.attribute("append"), Some("on"));
        assert_eq!(serial.child("target").unwrap().attribute("port"), Some("0"));
        assert!(xml.contains("it&apos;s &lt;web&gt;.qcow2"));
        assert!(!xml.contains("<uuid>"));
    }

    #[test]
    fn without_a_console_log_the_serial_port_is_not_captured() {
        let mut uncaptured = plan();
        uncaptured.console_log = None;
        let xml = uncaptured.to_xml();
        let domain = Element::parse(&xml).expect("well-formed XML");
        let serial = domain.child("devices").unwrap().child("serial").unwrap();
        assert!(serial.child("log").is_none());
    }

    #[test]
    fn without_graphics_or_its_password_nothing_listens() {
        let mut unprotected = plan();
        unprotected.graphics_password = None;
        assert!(!unprotected.to_xml().contains("<graphics"));
        let mut plan = plan();
        plan.graphics = None;
        plan.uuid = Some("0b3b4a53-1a5e-4bb9-8b45-4a2c1f1e1a11".into());
        plan.domain_type = "qemu".into();
        let xml = plan.to_xml();
        assert!(!xml.contains("<graphics"));
        assert!(xml.contains("<uuid>0b3b4a53-1a5e-4bb9-8b45-4a2c1f1e1a11</uuid>"));
    }

    #[test]
    fn networks_resolve_to_bridges_libvirt_networks_or_user_mode() {
        let sys = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(sys.path().join("br0/bridge")).unwrap();
        let network = |name: &str, mac: &str, ip: &str| NetworkConfig {
            network: name.into(),
            mac_address: mac.into(),
            ip_address: ip.into(),
        };
        let nics = plan_nics(
            "web",
            &[
                network("br0", "", ""),
                network("default", "52-54-00-AA-BB-CC", "192.168.122.10/24"),
                network("user", "", ""),
            ],
            sys.path(),
        )
        .unwrap();
        assert_eq!(nics[0].source, NicSource::Bridge("br0".into()));
        assert_eq!(nics[1].source, NicSource::Network("default".into()));
        assert_eq!(nics[1].mac, "52:54:00:aa:bb:cc");
        assert_eq!(nics[1].ip, Some(Ipv4Addr::new(192, 168, 122, 10)));
        assert_eq!(nics[2].source, NicSource::User);
        assert!(nics[0].mac.starts_with("52:54:00:"));
        assert_ne!(nics[0].mac, nics[2].mac);
        let again = plan_nics("web", &[network("br0", "", "")], sys.path()).unwrap();
        assert_eq!(again[0].mac, nics[0].mac, "derived MACs are stable");
        assert_eq!(
            dhcp_host_xml(&nics[1], "web").as_deref(),
            Some("<host mac='52:54:00:aa:bb:cc' name='web' ip='192.168.122.10'/>")
        );

        for (bad, field) in [
            (network("", "", ""), "spec.vm.networks[0].network"),
            (network("../x", "", ""), "spec.vm.networks[0].network"),
            (
                network("default", "01:00:5e:00:00:01", ""),
                "spec.vm.networks[0].mac_address",
            ),
            (
                network("default", "zz", ""),
                "spec.vm.networks[0].mac_address",
            ),
            (
                network("default", "", "10.0.0.300"),
                "spec.vm.networks[0].ip_address",
            ),
        ] {
            assert_eq!(plan_nics("w", &[bad], sys.path()).unwrap_err().field, field);
        }
    }

    #[test]
    fn names_resources_and_graphics_are_checked() {
        let spec = |name: &str| VmSpec {
            name: name.into(),
            vcpus: 1,
            memory_mb: 64,
            ..Default::default()
        };
        assert_eq!(domain_name("web", &spec("")).unwrap(), "web");
        assert_eq!(domain_name("web", &spec("db-1")).unwrap(), "db-1");
        assert!(domain_name("web", &spec("a/b")).is_err());
        assert!(domain_name("web", &spec("<x>")).is_err());
        assert_eq!(resources(&spec("")).unwrap(), (1, 64));
        assert!(resources(&VmSpec::default()).is_err());
        let mut with_graphics = spec("");
        with_graphics
            .metadata
            .insert("graphics".into(), "VNC".into());
        assert_eq!(graphics(&with_graphics).unwrap(), Some(Graphics::Vnc));
        with_graphics
            .metadata
            .insert("graphics".into(), "rdp".into());
        assert!(graphics(&with_graphics).is_err());
    }
}
