//! What libvirt shows of one VM workload, read once per reconcile.

use super::errors::VmError;
use super::libvirt::{FoundDomain, Hypervisor};

/// The workload's domains as libvirt has them. An unreachable libvirt
/// yields no observation: the error path reports `Unknown` instead.
#[derive(Debug, Clone, Default)]
pub(crate) struct Observation {
    /// The first look since the agent started: every domain was searched
    /// for the workload's marks (later looks go by name), and a domain
    /// found is adopted.
    pub(crate) first_look: bool,
    /// The domain called by the workload's domain name, whoever owns it:
    /// another's is never touched.
    pub(crate) by_name: Option<FoundDomain>,
    /// The workload's domain: the marked one with the planned name, else
    /// another marked one (a rename in progress).
    pub(crate) current: Option<FoundDomain>,
    /// Further domains marked as the workload's, to remove.
    pub(crate) duplicates: Vec<FoundDomain>,
}

impl Observation {
    /// Every domain marked as the workload's.
    pub(crate) fn domains(&self) -> impl Iterator<Item = &FoundDomain> {
        self.current.iter().chain(&self.duplicates)
    }
}

/// Looks workload `id`'s domains up: by `name`, and by marks among all
/// domains of `scope` on the first look (or when the name is not ours).
pub(crate) async fn observe(
    hypervisor: &Hypervisor,
    id: &str,
    scope: &str,
    name: &str,
    first_look: bool,
) -> Result<Observation, VmError> {
    let lookup = hypervisor.lookup(id, scope, name, first_look).await?;
    let mut managed = lookup.managed;
    managed.sort_by_key(|d| d.name != name);
    let mut managed = managed.into_iter();
    Ok(Observation {
        first_look,
        by_name: lookup.by_name,
        current: managed.next(),
        duplicates: managed.collect(),
    })
}
