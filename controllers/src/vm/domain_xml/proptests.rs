//! The domain XML the agent writes, read back the way the agent reads
//! libvirt's descriptions ([`LiveDomain::from_xml`], [`Marks::parse`]):
//! every value comes back as written, but for the two things XML itself
//! changes (characters XML 1.0 forbids become U+FFFD, and the text of an
//! element is read trimmed). And the reader, given any text or a written
//! description with random edits, answers something or nothing, never a
//! panic.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use persys_test_support::mutate::{apply_text, edits};
use proptest::prelude::*;

use super::{DomainPlan, Graphics, NicPlan, NicSource};
use crate::vm::disks::{Bus, DiskFormat, DiskKind, DiskPlan};
use crate::vm::graphics::Password;
use crate::vm::libvirt::{DomainState, LiveDisk, LiveDomain, LiveInterface, PowerState};
use crate::vm::marks::Marks;
use crate::vm::xml::{Element, tokens, unescape};

/// What XML makes of a text: forbidden characters replaced (as
/// [`crate::vm::xml::escape`] does).
fn as_xml(text: &str) -> String {
    text.chars()
        .map(|c| match c {
            '\t' | '\n' | '\r' => c,
            c if (c as u32) < 0x20 || c == '\u{FFFE}' || c == '\u{FFFF}' => '\u{FFFD}',
            c => c,
        })
        .collect()
}

/// What an element's text reads back as.
fn as_element_text(text: &str) -> String {
    as_xml(text).trim().to_string()
}

/// Any text, with a fair share of what XML escapes and of whitespace.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        2 => "[a-z0-9][a-z0-9._-]{0,12}",
        2 => prop::collection::vec(
            prop_oneof![
                Just("<".to_string()), Just(">".to_string()), Just("&".to_string()),
                Just("'".to_string()), Just("\"".to_string()), Just("&amp;".to_string()),
                Just("&#x41;".to_string()), Just("]]>".to_string()), Just("<!--".to_string()),
                Just(" ".to_string()), Just("\n".to_string()), Just("\u{1}".to_string()),
                Just("\u{FFFF}".to_string()), Just("é".to_string()), Just("/".to_string()),
                "[a-z]{1,4}",
            ],
            0..8,
        ).prop_map(|parts| parts.concat()),
        1 => ".{0,16}",
    ]
}

fn disk() -> impl Strategy<Value = DiskPlan> {
    (
        text(),
        prop::sample::select(vec![DiskFormat::Qcow2, DiskFormat::Raw, DiskFormat::Iso]),
        prop::sample::select(vec![DiskKind::Disk, DiskKind::Cdrom]),
        text(),
        prop::sample::select(vec![Bus::Virtio, Bus::Sata, Bus::Ide]),
        prop::option::of(any::<u32>()),
        any::<bool>(),
        prop::option::of(text()),
    )
        .prop_map(
            |(path, format, kind, target, bus, boot_order, read_only, serial)| DiskPlan {
                path: PathBuf::from(path),
                format,
                kind,
                target,
                bus,
                boot_order,
                size_gb: 1,
                is_seed: false,
                field: "spec.vm.disks[0]".into(),
                read_only,
                serial,
            },
        )
}

fn nic() -> impl Strategy<Value = NicPlan> {
    (
        prop_oneof![
            text().prop_map(NicSource::Network),
            text().prop_map(NicSource::Bridge),
            Just(NicSource::User),
        ],
        text(),
        prop::option::of(any::<u32>().prop_map(Ipv4Addr::from)),
    )
        .prop_map(|(source, mac, ip)| NicPlan { source, mac, ip })
}

fn marks() -> impl Strategy<Value = Marks> {
    (
        text(),
        text(),
        text(),
        text(),
        any::<i64>(),
        prop::collection::vec(text(), 0..3),
        prop::option::of(text()),
    )
        .prop_map(
            |(workload_id, scope, revision, spec_hash, generation, created_disks, seed)| Marks {
                workload_id,
                scope,
                revision,
                spec_hash,
                generation,
                created_disks,
                seed,
            },
        )
}

fn plan() -> impl Strategy<Value = DomainPlan> {
    (
        text(),
        prop::option::of(text()),
        prop::sample::select(vec!["kvm".to_string(), "qemu".to_string()]),
        any::<u32>(),
        prop_oneof![3 => 1..65536u64, 1 => any::<u64>()],
        prop::collection::vec(disk(), 0..4),
        prop::collection::vec(nic(), 0..3),
        prop::option::of(prop::sample::select(vec![Graphics::Vnc, Graphics::Spice])),
        (text(), marks()),
        prop::option::of(text()),
    )
        .prop_map(
            |(
                name,
                uuid,
                domain_type,
                vcpus,
                memory_mib,
                disks,
                nics,
                graphics,
                (password, marks),
                console_log,
            )| {
                DomainPlan {
                    name,
                    uuid,
                    domain_type,
                    vcpus,
                    memory_mib,
                    disks,
                    nics,
                    graphics,
                    graphics_password: Some(Password::new(password)),
                    console_log: console_log.map(PathBuf::from),
                    marks,
                }
            },
        )
}

/// The marks as they read back: trimmed, and none without a workload id.
fn marks_read_back(marks: &Marks) -> Option<Marks> {
    let workload_id = as_element_text(&marks.workload_id);
    if workload_id.is_empty() {
        return None;
    }
    Some(Marks {
        workload_id,
        scope: as_element_text(&marks.scope),
        revision: as_element_text(&marks.revision),
        spec_hash: as_element_text(&marks.spec_hash),
        generation: marks.generation,
        created_disks: marks
            .created_disks
            .iter()
            .map(|d| as_element_text(d))
            .filter(|d| !d.is_empty())
            .collect(),
        seed: marks
            .seed
            .as_deref()
            .map(as_element_text)
            .filter(|s| !s.is_empty()),
    })
}

const STATE: DomainState = DomainState {
    power: PowerState::Running,
    reason: 1,
};

/// XML syntax, for edits of a written description.
const XML_SYNTAX: &[&str] = &[
    "<",
    ">",
    "/>",
    "</",
    "<a>",
    "</a>",
    "<domain>",
    "</domain>",
    "<devices>",
    "</devices>",
    "<disk>",
    "</disk>",
    "<metadata>",
    "<persys:workload>",
    "</persys:workload>",
    "'",
    "\"",
    "=",
    "&",
    "&amp;",
    "&#",
    "&#x",
    "&#xFFFFFFFF;",
    "&#99999999999;",
    ";",
    "<!--",
    "-->",
    "<![CDATA[",
    "]]>",
    "<?",
    "?>",
    "<!DOCTYPE x>",
    ":",
    " ",
    "\n",
    "unit='GiB'",
    "unit='b'",
    "18446744073709551615",
    "99999999999999999999",
    "-1",
];

proptest! {
    #[test]
    fn domain_xml_reads_back_as_the_plan_it_was_written_from(plan in plan()) {
        let xml = plan.to_xml();
        let live = LiveDomain::from_xml("uuid-1", STATE, &xml);
        let live = live.ok_or_else(|| TestCaseError::fail(format!("not read back:\n{xml}")))?;
        prop_assert_eq!(&live.name, &as_element_text(&plan.name));
        prop_assert_eq!(&live.domain_type, &plan.domain_type);
        prop_assert_eq!(live.vcpus, plan.vcpus);
        prop_assert_eq!(live.memory_kib, plan.memory_mib.saturating_mul(1024));
        let disks: Vec<LiveDisk> = plan
            .disks
            .iter()
            .map(|d| LiveDisk {
                target: as_xml(&d.target),
                source: as_xml(&d.path.to_string_lossy()),
                device: match d.kind {
                    DiskKind::Disk => "disk".into(),
                    DiskKind::Cdrom => "cdrom".into(),
                },
            })
            .collect();
        prop_assert_eq!(&live.disks, &disks);
        let interfaces: Vec<LiveInterface> = plan
            .nics
            .iter()
            .map(|n| LiveInterface {
                kind: match n.source {
                    NicSource::Network(_) => "network".into(),
                    NicSource::Bridge(_) => "bridge".into(),
                    NicSource::User => "user".into(),
                },
                mac: as_xml(&n.mac),
                host_device: None,
            })
            .collect();
        prop_assert_eq!(&live.interfaces, &interfaces);
        prop_assert_eq!(&live.marks, &marks_read_back(&plan.marks));
        // The metadata element alone, as libvirt hands it back.
        prop_assert_eq!(Marks::parse(&plan.marks.to_xml("")), marks_read_back(&plan.marks));
        // Every source and target the writer put in, in order.
        let domain = Element::parse(&xml).ok_or_else(|| TestCaseError::fail("no element"))?;
        let sources: Vec<&str> = domain
            .child("devices")
            .into_iter()
            .flat_map(|d| d.children_named("interface"))
            .filter_map(|i| i.child("source"))
            .filter_map(|s| s.attribute("network").or_else(|| s.attribute("bridge")))
            .collect();
        let written: Vec<String> = plan
            .nics
            .iter()
            .filter_map(|n| match &n.source {
                NicSource::Network(name) | NicSource::Bridge(name) => Some(as_xml(name)),
                NicSource::User => None,
            })
            .collect();
        prop_assert_eq!(sources, written);
        // The console log's file, escaped like every other path.
        let log = domain
            .child("devices")
            .and_then(|d| d.child("serial"))
            .and_then(|s| s.child("log"))
            .and_then(|l| l.attribute("file"))
            .map(str::to_string);
        prop_assert_eq!(log, plan.console_log.as_ref().map(|p| as_xml(&p.to_string_lossy())));
    }

    #[test]
    fn the_libvirt_xml_reader_never_panics_on_an_edited_description(
        plan in plan(),
        edits in edits(XML_SYNTAX, 6),
    ) {
        let xml = apply_text(&plan.to_xml(), &edits);
        let _ = LiveDomain::from_xml("uuid-1", STATE, &xml);
        let _ = Marks::parse(&xml);
        let _ = tokens(&xml);
    }

    #[test]
    fn the_libvirt_xml_reader_never_panics_on_any_text(
        xml in prop_oneof![
            ".{0,200}",
            prop::collection::vec(prop::sample::select(XML_SYNTAX), 0..40).prop_map(|p| p.concat()),
        ]
    ) {
        let _ = LiveDomain::from_xml("uuid-1", STATE, &xml);
        let _ = Marks::parse(&xml);
        let _ = Element::parse(&xml);
        let _ = unescape(&xml);
    }
}
