//! What a caller that does not see secrets gets instead of them.
//!
//! Container env values, compose `.env` values and cloud-init user-data (and
//! vendor-data) are replaced by `<redacted sha256:xxxxxxxx>`: the first 8 hex
//! digits of the value's SHA-256, so a changed value stays visible without
//! showing it. Keys, images, commands and everything else stay as stored.

use persys_api::v1::Workload;
use persys_api::v1::workload_spec::Spec;
use sha2::{Digest, Sha256};

/// `<redacted sha256:…>` for `value`; an empty value stays empty (nothing
/// to hide, and "unset" stays visible).
pub fn redacted(value: &str) -> String {
    if value.is_empty() {
        return String::new();
    }
    let digest = Sha256::digest(value.as_bytes());
    format!("<redacted sha256:{}>", hex::encode(&digest[..4]))
}

fn redact_in_place(value: &mut String) {
    *value = redacted(value);
}

/// Replaces every secret value of `workload`'s spec.
pub fn redact(workload: &mut Workload) {
    let Some(spec) = workload
        .spec
        .as_mut()
        .and_then(|s| s.workload.as_mut())
        .and_then(|w| w.spec.as_mut())
    else {
        return;
    };
    match spec {
        Spec::Container(container) => container.env.values_mut().for_each(redact_in_place),
        Spec::Compose(compose) => compose.env.values_mut().for_each(redact_in_place),
        Spec::Vm(vm) => {
            redact_in_place(&mut vm.cloud_init);
            if let Some(config) = vm.cloud_init_config.as_mut() {
                redact_in_place(&mut config.user_data);
                redact_in_place(&mut config.vendor_data);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use persys_api::v1::{
        CloudInitConfig, ComposeSpec, ContainerSpec, ObjectSpec, VmSpec, WorkloadSpec,
    };

    fn workload(spec: Spec) -> Workload {
        Workload {
            spec: Some(ObjectSpec {
                workload: Some(WorkloadSpec { spec: Some(spec) }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn inner(workload: &Workload) -> &Spec {
        workload
            .spec
            .as_ref()
            .and_then(|s| s.workload.as_ref())
            .and_then(|w| w.spec.as_ref())
            .unwrap()
    }

    #[test]
    fn env_values_are_replaced_by_a_short_digest_and_keys_stay() {
        let mut w = workload(Spec::Container(ContainerSpec {
            image: "nginx".into(),
            env: [("PASSWORD".to_string(), "hunter2".to_string())].into(),
            ..Default::default()
        }));
        redact(&mut w);
        let Spec::Container(c) = inner(&w) else {
            panic!()
        };
        // sha256("hunter2") = f52fbd32…
        assert_eq!(c.env["PASSWORD"], "<redacted sha256:f52fbd32>");
        assert_eq!(c.image, "nginx");
    }

    #[test]
    fn compose_env_and_cloud_init_user_data_are_redacted() {
        let mut w = workload(Spec::Compose(ComposeSpec {
            compose_yaml: "services: {}".into(),
            env: [("TOKEN".to_string(), "abc".to_string())].into(),
            ..Default::default()
        }));
        redact(&mut w);
        let Spec::Compose(c) = inner(&w) else {
            panic!()
        };
        assert!(c.env["TOKEN"].starts_with("<redacted sha256:"));
        assert_eq!(c.compose_yaml, "services: {}");

        let mut w = workload(Spec::Vm(VmSpec {
            cloud_init: "#cloud-config\npassword: x".into(),
            cloud_init_config: Some(CloudInitConfig {
                user_data: "#cloud-config\npassword: y".into(),
                meta_data: "instance-id: a".into(),
                ..Default::default()
            }),
            ..Default::default()
        }));
        redact(&mut w);
        let Spec::Vm(vm) = inner(&w) else { panic!() };
        assert!(vm.cloud_init.starts_with("<redacted sha256:"));
        let config = vm.cloud_init_config.as_ref().unwrap();
        assert!(config.user_data.starts_with("<redacted sha256:"));
        assert_eq!(config.meta_data, "instance-id: a");
        assert_eq!(config.vendor_data, "");
    }

    #[test]
    fn a_changed_value_changes_its_digest() {
        assert_ne!(redacted("a"), redacted("b"));
        assert_eq!(redacted("a"), redacted("a"));
    }
}
