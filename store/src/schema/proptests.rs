//! Decoding what is stored: random bytes, and stored values with random
//! edits, give an error or (for an edit that left the value intact, or one
//! outside the sealed object) the value that was stored, never a panic.
//! A sealed object cannot be changed by any edit of its record without the
//! open failing.

use persys_api::v1::{
    ContainerSpec, Event, ObjectMeta, ObjectSpec, Workload, WorkloadSpec, workload_spec,
};
use persys_test_support::mutate::{apply_bytes, edits};
use proptest::prelude::*;
use prost::Message;

use super::{open_event, open_object, open_record, seal_record};
use crate::record::{LogRecord, decode_u64};
use crate::seal::{Aad, NodeKey, Sealer, key_check, key_check_opens};

/// Pieces of protobuf that change the structure: tags of the record's
/// fields with every wire type, varint continuations, huge lengths.
/// (Bytes from 0x80 up, varint continuations, come from the edits that
/// set a byte.)
const WIRE: &[&str] = &[
    "\u{0}",
    "\u{8}",
    "\u{10}",
    "\u{12}",
    "\u{1a}",
    "\u{22}",
    "\u{2a}",
    "\u{42}",
    "\u{4a}",
    "\u{7f}",
    "\u{1}",
    "\u{5}",
    "\u{4b}",
    "\u{4c}",
    "\u{4a}\u{7f}",
    "\u{12}\u{0}",
];

thread_local! {
    static SEALER: Sealer = NodeKey::generate()
        .and_then(|key| Sealer::new(&key))
        .expect("a node key from the OS");
}

fn workload() -> impl Strategy<Value = Workload> {
    (
        "[a-z0-9][a-z0-9._-]{0,20}",
        any::<u64>(),
        any::<i64>(),
        ".{0,40}",
        prop::collection::btree_map("[A-Z_]{1,8}", ".{0,16}", 0..4),
    )
        .prop_map(|(id, rv, generation, image, env)| Workload {
            metadata: Some(ObjectMeta {
                id,
                resource_version: rv,
                generation,
                ..Default::default()
            }),
            spec: Some(ObjectSpec {
                desired_state: 1,
                workload: Some(WorkloadSpec {
                    spec: Some(workload_spec::Spec::Container(ContainerSpec {
                        image,
                        env,
                        ..Default::default()
                    })),
                }),
            }),
            status: None,
        })
}

fn record() -> impl Strategy<Value = LogRecord> {
    (
        workload(),
        1..4i32,
        any::<u64>(),
        ".{0,12}",
        any::<i64>(),
        ".{0,20}",
    )
        .prop_map(|(object, kind, rv, action, at_ms, caller)| LogRecord {
            kind,
            resource_version: rv,
            object: Some(object),
            action,
            at_ms,
            caller,
            role: "scheduler".into(),
        })
}

fn bytes() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 0..256)
}

proptest! {
    #[test]
    fn random_bytes_never_open_as_a_sealed_record_object_or_event(bytes in bytes()) {
        SEALER.with(|sealer| {
            prop_assert!(open_record(sealer, &bytes).is_err());
            prop_assert!(open_object(sealer, b"web", &bytes).is_err());
            prop_assert!(open_event(sealer, b"web\0key", &bytes).is_err());
            prop_assert!(sealer.open(Aad::KeyCheck, &bytes, "key check").is_err());
            prop_assert!(!key_check_opens(sealer, &bytes));
            Ok(())
        })?;
        // A store without sealing has no authentication: anything may
        // decode, but nothing panics.
        let plain = Sealer::plain();
        let _ = open_record(&plain, &bytes);
        let _ = open_object(&plain, b"web", &bytes);
        let _ = open_event(&plain, b"web\0key", &bytes);
        // The older schemas' clear records, and the meta counters.
        let _ = LogRecord::decode(&*bytes);
        prop_assert_eq!(decode_u64(&bytes).is_some(), bytes.len() == 8);
    }

    #[test]
    fn an_edited_sealed_record_fails_or_still_holds_the_object_it_was_sealed_with(
        record in record(),
        edits in edits(WIRE, 4),
    ) {
        SEALER.with(|sealer| {
            let stored = seal_record(sealer, record.clone()).map_err(|e| TestCaseError::fail(e.to_string()))?;
            let opened = open_record(sealer, &stored).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(&opened, &record, "a record opens as it was sealed");
            let edited = apply_bytes(&stored, &edits);
            if let Ok(opened) = open_record(sealer, &edited) {
                prop_assert_eq!(opened.object, record.object, "an edit reached the sealed object");
            }
            Ok(())
        })?;
    }

    #[test]
    fn an_edited_sealed_value_never_opens_changed(
        value in bytes(),
        edits in edits(WIRE, 4),
    ) {
        SEALER.with(|sealer| {
            let sealed = sealer.seal(Aad::Object(b"web"), &value).map_err(|e| TestCaseError::fail(e.to_string()))?;
            let edited = apply_bytes(&sealed, &edits);
            match sealer.open(Aad::Object(b"web"), &edited, "web") {
                Ok(opened) => {
                    prop_assert_eq!(&edited, &sealed, "only the untouched value opens");
                    prop_assert_eq!(opened, value);
                }
                Err(_) => prop_assert_ne!(&edited, &sealed),
            }
            let check = key_check(sealer).map_err(|e| TestCaseError::fail(e.to_string()))?;
            let edited = apply_bytes(&check, &edits);
            prop_assert_eq!(key_check_opens(sealer, &edited), edited == check);
            Ok(())
        })?;
    }

    #[test]
    fn an_edited_event_fails_or_opens_as_it_was(
        reason in ".{0,20}",
        message in ".{0,60}",
        count in any::<u32>(),
        edits in edits(WIRE, 4),
    ) {
        let event = Event {
            workload_id: "web".into(),
            r#type: 1,
            reason,
            message,
            count,
            first_seen_ms: 1,
            last_seen_ms: 2,
        };
        SEALER.with(|sealer| {
            let key = b"web\0abcdefgh";
            let sealed = sealer.seal(Aad::Event(key), &event.encode_to_vec()).map_err(|e| TestCaseError::fail(e.to_string()))?;
            let edited = apply_bytes(&sealed, &edits);
            if let Ok(opened) = open_event(sealer, key, &edited) {
                prop_assert_eq!(opened, event);
            }
            Ok(())
        })?;
    }
}
