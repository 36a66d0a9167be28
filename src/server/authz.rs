//! Who may call what.
//!
//! One CA signs the scheduler's, the operators' and every node's
//! certificate, so the chain alone proves nothing about a caller's role.
//! The role comes from the verified certificate's subject through a
//! [`Policy`]: the built-in default maps CN `persys-scheduler` to
//! `scheduler` and CN `persysctl` to `operator` and denies everyone else;
//! `PERSYS_AUTHZ_FILE` replaces it with rules of its own.
//!
//! - [`Identified`] wraps each TLS connection and reads the client
//!   certificate's [`Identity`] once, at the handshake.
//! - [`AuthzLayer`] sits in front of every service: it decides the caller's
//!   role for the method called, refuses with `PERMISSION_DENIED` naming the
//!   identity, the RPC and the rule, and attaches a [`Caller`] to the
//!   requests it lets through. Handlers read that; none derives it again.
//! - [`PolicyHandle`] holds the policy in force and reloads the file when
//!   it changes; a file that does not load keeps the previous policy.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_rustls::server::TlsStream;
use tonic::transport::server::Connected;

/// The agent's own service, as it appears in request paths.
const AGENT_SERVICE: &str = "persys.agent.v1.AgentService";
const HEALTH_SERVICE: &str = "grpc.health.v1.Health";
const REFLECTION_SERVICES: [&str; 2] = [
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
];

/// What the `scheduler` role may call: desired state in, state out.
const SCHEDULER_RPCS: &[&str] = &[
    "ApplyWorkload",
    "DeleteWorkload",
    "GetWorkloadStatus",
    "ListWorkloads",
    "Watch",
    "DescribeWorkload",
    "ListActions",
    "HealthCheck",
];

/// What the `viewer` role may call: reads only (logs included; exec and
/// console are the operator's).
const VIEWER_RPCS: &[&str] = &[
    "GetWorkloadStatus",
    "ListWorkloads",
    "Watch",
    "DescribeWorkload",
    "ListActions",
    "HealthCheck",
    "StreamLogs",
];

/// The operator's session RPCs, named in metrics like the others.
const STREAM_RPCS: &[&str] = &["StreamLogs", "Exec", "Console"];

/// A fixed set of RPCs a caller may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// The Persys scheduler: applies, deletes and reads workloads.
    Scheduler,
    /// A person with `persysctl`: everything, including logs and exec.
    Operator,
    /// Dashboards and auditors: reads, with secret values redacted.
    Viewer,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Scheduler => "scheduler",
            Role::Operator => "operator",
            Role::Viewer => "viewer",
        }
    }

    fn parse(name: &str) -> Option<Role> {
        match name {
            "scheduler" => Some(Role::Scheduler),
            "operator" => Some(Role::Operator),
            "viewer" => Some(Role::Viewer),
            _ => None,
        }
    }

    /// Whether this role sees secret values (env values, compose `.env`
    /// values, cloud-init user-data) as stored.
    pub fn sees_secrets(self) -> bool {
        !matches!(self, Role::Viewer)
    }

    fn allows(self, rpc: &Rpc) -> bool {
        match (self, rpc) {
            (_, Rpc::Health) => true,
            (Role::Operator, _) => true,
            (Role::Viewer, Rpc::Reflection) => true,
            (Role::Scheduler, Rpc::Reflection) => false,
            (Role::Scheduler, Rpc::Agent(name)) => SCHEDULER_RPCS.contains(&name.as_str()),
            (Role::Viewer, Rpc::Agent(name)) => VIEWER_RPCS.contains(&name.as_str()),
            (_, Rpc::Other(_)) => false,
        }
    }

    /// What the role may call, for a refusal's message.
    fn allowed_list(self) -> String {
        match self {
            Role::Operator => "every RPC".into(),
            Role::Scheduler => SCHEDULER_RPCS.join(", "),
            Role::Viewer => format!("{}, reflection", VIEWER_RPCS.join(", ")),
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The RPC a request path names.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Rpc {
    /// A method of `persys.agent.v1.AgentService`.
    Agent(String),
    /// `grpc.health.v1.Health`: open to every verified certificate.
    Health,
    /// gRPC server reflection.
    Reflection,
    /// Any other path (an unknown service).
    Other(String),
}

impl Rpc {
    fn from_path(path: &str) -> Rpc {
        let path = path.trim_start_matches('/');
        let (service, method) = path.split_once('/').unwrap_or((path, ""));
        if service == AGENT_SERVICE {
            Rpc::Agent(method.to_string())
        } else if service == HEALTH_SERVICE {
            Rpc::Health
        } else if REFLECTION_SERVICES.contains(&service) {
            Rpc::Reflection
        } else {
            Rpc::Other(path.to_string())
        }
    }

    /// A bounded metric label: known methods by name, anything else `unknown`.
    fn label(&self) -> &str {
        match self {
            Rpc::Agent(name)
                if SCHEDULER_RPCS.contains(&name.as_str())
                    || STREAM_RPCS.contains(&name.as_str()) =>
            {
                name
            }
            Rpc::Health => "Health",
            Rpc::Reflection => "Reflection",
            _ => "unknown",
        }
    }
}

impl fmt::Display for Rpc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rpc::Agent(name) => write!(f, "{AGENT_SERVICE}/{name}"),
            Rpc::Health => f.write_str(HEALTH_SERVICE),
            Rpc::Reflection => f.write_str("gRPC reflection"),
            Rpc::Other(path) => write!(f, "/{path}"),
        }
    }
}

// ---------------------------------------------------------------------------
// Identity

/// Who a verified client certificate names: its subject's CN and OUs and
/// its DNS and URI subject alternative names (so SPIFFE IDs work).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Identity {
    pub cn: Option<String>,
    pub ou: Vec<String>,
    pub dns: Vec<String>,
    pub uri: Vec<String>,
}

impl Identity {
    /// Reads the identity of a DER certificate (already verified by TLS).
    pub fn from_der(der: &[u8]) -> Result<Identity, String> {
        use x509_parser::prelude::*;
        let (_, cert) = X509Certificate::from_der(der)
            .map_err(|e| format!("the client certificate does not parse: {e}"))?;
        let text = |attr: &x509_parser::x509::AttributeTypeAndValue| {
            attr.as_str().ok().map(str::to_string)
        };
        let subject = cert.subject();
        let mut identity = Identity {
            cn: subject.iter_common_name().next().and_then(text),
            ou: subject
                .iter_organizational_unit()
                .filter_map(text)
                .collect(),
            ..Identity::default()
        };
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                match name {
                    GeneralName::DNSName(dns) => identity.dns.push(dns.to_string()),
                    GeneralName::URI(uri) => identity.uri.push(uri.to_string()),
                    _ => {}
                }
            }
        }
        Ok(identity)
    }

    /// Reads the identity of the first certificate of a PEM file.
    pub fn from_pem_file(path: &Path) -> Result<Identity, String> {
        use rustls_pki_types::CertificateDer;
        use rustls_pki_types::pem::PemObject;
        let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let cert = CertificateDer::pem_slice_iter(&bytes)
            .next()
            .ok_or_else(|| format!("{}: no certificate in the file", path.display()))?
            .map_err(|e| format!("{}: {e}", path.display()))?;
        Identity::from_der(&cert).map_err(|e| format!("{}: {e}", path.display()))
    }
}

impl fmt::Display for Identity {
    /// The shortest name that says who it is: `CN=…`, else the first URI
    /// or DNS name; never the whole certificate.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(cn) = &self.cn {
            write!(f, "CN={cn}")
        } else if let Some(uri) = self.uri.first() {
            write!(f, "URI={uri}")
        } else if let Some(dns) = self.dns.first() {
            write!(f, "DNS={dns}")
        } else if let Some(ou) = self.ou.first() {
            write!(f, "OU={ou}")
        } else {
            f.write_str("a certificate with no CN, OU or SAN")
        }
    }
}

/// What a connection knows about its peer, read once at the handshake and
/// attached (cheaply cloned) to each of its requests by tonic.
#[derive(Debug, Clone)]
pub struct PeerIdentity(pub Arc<Identity>);

/// A TLS connection with its client's identity read at the handshake.
pub struct Identified<S> {
    stream: S,
    peer: PeerIdentity,
}

impl<IO> Identified<TlsStream<IO>> {
    /// Reads the identity of the verified client certificate; a connection
    /// without one (the verifier requires it, so this is a defect) is refused.
    pub fn new(stream: TlsStream<IO>) -> Result<Self, String> {
        let (_, session) = stream.get_ref();
        let leaf = session
            .peer_certificates()
            .and_then(|certs| certs.first())
            .ok_or_else(|| "no client certificate".to_string())?;
        let identity = Identity::from_der(leaf)?;
        Ok(Identified {
            stream,
            peer: PeerIdentity(Arc::new(identity)),
        })
    }
}

impl<S> Connected for Identified<S>
where
    S: Send + 'static,
{
    type ConnectInfo = PeerIdentity;

    fn connect_info(&self) -> PeerIdentity {
        self.peer.clone()
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Identified<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Identified<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

// ---------------------------------------------------------------------------
// Policy

/// A name pattern: `*` matches any run of characters, `?` one, `[…]` a set.
#[derive(Debug, Clone)]
struct NamePattern(glob::Pattern);

impl NamePattern {
    fn new(text: &str) -> Result<NamePattern, String> {
        if text.is_empty() {
            return Err("an empty pattern matches nothing".into());
        }
        glob::Pattern::new(text)
            .map(NamePattern)
            .map_err(|e| format!("{text:?} is not a valid pattern: {e}"))
    }

    fn matches(&self, value: &str) -> bool {
        self.0.matches(value)
    }
}

impl<'de> serde::Deserialize<'de> for NamePattern {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        NamePattern::new(&text).map_err(serde::de::Error::custom)
    }
}

/// What a rule matches: every field given must match (a multi-valued one,
/// such as the DNS names, when any of its values does).
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Match {
    cn: Option<NamePattern>,
    ou: Option<NamePattern>,
    dns: Option<NamePattern>,
    uri: Option<NamePattern>,
}

impl Match {
    fn is_empty(&self) -> bool {
        self.cn.is_none() && self.ou.is_none() && self.dns.is_none() && self.uri.is_none()
    }

    fn matches(&self, identity: &Identity) -> bool {
        let any = |pattern: &Option<NamePattern>, values: &[String]| {
            pattern
                .as_ref()
                .is_none_or(|p| values.iter().any(|v| p.matches(v)))
        };
        self.cn
            .as_ref()
            .is_none_or(|p| identity.cn.as_deref().is_some_and(|cn| p.matches(cn)))
            && any(&self.ou, &identity.ou)
            && any(&self.dns, &identity.dns)
            && any(&self.uri, &identity.uri)
    }
}

/// What a matching rule grants: a role, or an explicit refusal (to carve
/// an exception out of a broader rule below it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Grant {
    Role(Role),
    Deny,
}

impl<'de> serde::Deserialize<'de> for Grant {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let name = String::deserialize(deserializer)?;
        match (Role::parse(&name), name.as_str()) {
            (Some(role), _) => Ok(Grant::Role(role)),
            (None, "deny") => Ok(Grant::Deny),
            _ => Err(serde::de::Error::custom(format!(
                "role {name:?} is not one of scheduler, operator, viewer, deny"
            ))),
        }
    }
}

#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleText {
    #[serde(rename = "match")]
    matcher: Match,
    role: Grant,
}

#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyText {
    rules: Vec<RuleText>,
}

#[derive(Debug, Clone)]
struct Rule {
    matcher: Match,
    grant: Grant,
    /// Where the rule is written, for messages: `file:line`, or the
    /// default policy's own wording.
    origin: String,
}

/// Rules, first match wins; no match is a refusal.
#[derive(Debug, Clone)]
pub struct Policy {
    rules: Vec<Rule>,
    /// Where the policy came from, for messages.
    source: String,
}

/// A policy file that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct PolicyError(String);

/// The role a policy gives an identity, and the rule that decided it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub role: Option<Role>,
    /// `rule 2 (/etc/persys/authz.yaml:7)`, or why nothing matched.
    pub rule: String,
}

impl Policy {
    /// The platform's own certificate names: CN `persys-scheduler` is the
    /// scheduler, CN `persysctl` an operator; nobody else, the nodes' own
    /// certificates included, gets anything.
    pub fn default_policy() -> Policy {
        let rule = |cn: &str, role: Role| Rule {
            matcher: Match {
                cn: NamePattern::new(cn).ok(),
                ou: None,
                dns: None,
                uri: None,
            },
            grant: Grant::Role(role),
            origin: format!("the default policy's rule CN {cn} → {role}"),
        };
        Policy {
            rules: vec![
                rule("persys-scheduler", Role::Scheduler),
                rule("persysctl", Role::Operator),
            ],
            source: "the default policy".into(),
        }
    }

    /// Reads a policy file; errors name the file and line.
    pub fn load(path: &Path) -> Result<Policy, PolicyError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| PolicyError(format!("{}: {e}", path.display())))?;
        Policy::parse(&text, &path.display().to_string())
    }

    fn parse(text: &str, source: &str) -> Result<Policy, PolicyError> {
        let at = |error: &serde_yaml_ng::Error| match error.location() {
            Some(location) => format!("{source}:{}:{}", location.line(), location.column()),
            None => source.to_string(),
        };
        let parsed: PolicyText = serde_yaml_ng::from_str(text).map_err(|error| {
            let message = error.to_string();
            // serde_yaml_ng appends " at line L column C"; the location
            // leads instead, as compilers print it.
            let message = message
                .split(" at line ")
                .next()
                .unwrap_or(&message)
                .to_string();
            PolicyError(format!("{}: {message}", at(&error)))
        })?;
        // Lines of each rule, for messages: the n-th `- match:`/`- role:`
        // list item under `rules:`.
        let lines = rule_lines(text);
        let mut rules = Vec::with_capacity(parsed.rules.len());
        for (index, rule) in parsed.rules.into_iter().enumerate() {
            let origin = match lines.get(index) {
                Some(line) => format!("rule {} ({source}:{line})", index + 1),
                None => format!("rule {} ({source})", index + 1),
            };
            if rule.matcher.is_empty() {
                return Err(PolicyError(format!(
                    "{}: rule {}: match needs at least one of cn, ou, dns, uri",
                    lines
                        .get(index)
                        .map(|line| format!("{source}:{line}"))
                        .unwrap_or_else(|| source.to_string()),
                    index + 1
                )));
            }
            rules.push(Rule {
                matcher: rule.matcher,
                grant: rule.role,
                origin,
            });
        }
        Ok(Policy {
            rules,
            source: source.to_string(),
        })
    }

    /// The role of `identity`, first matching rule wins.
    pub fn decide(&self, identity: &Identity) -> Decision {
        for rule in &self.rules {
            if rule.matcher.matches(identity) {
                return Decision {
                    role: match rule.grant {
                        Grant::Role(role) => Some(role),
                        Grant::Deny => None,
                    },
                    rule: rule.origin.clone(),
                };
            }
        }
        Decision {
            role: None,
            rule: format!("no rule of {} matches", self.source),
        }
    }

    /// Where this policy came from.
    pub fn source(&self) -> &str {
        &self.source
    }
}

/// The line of each list item directly under `rules:` (1-based), in order.
fn rule_lines(text: &str) -> Vec<usize> {
    let mut lines = Vec::new();
    let mut item_indent = None;
    let mut in_rules = false;
    for (number, line) in text.lines().enumerate() {
        let trimmed = line.trim_start();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let indent = line.len() - trimmed.len();
        if indent == 0 && !trimmed.starts_with('-') {
            in_rules = trimmed.starts_with("rules:");
            item_indent = None;
            continue;
        }
        if in_rules && trimmed.starts_with('-') && item_indent.is_none_or(|i| i == indent) {
            item_indent = Some(indent);
            lines.push(number + 1);
        }
    }
    lines
}

/// The policy in force, replaced when its file changes.
#[derive(Clone)]
pub struct PolicyHandle {
    /// A std lock: read once per request, written once per reload.
    current: Arc<RwLock<Arc<Policy>>>,
}

impl PolicyHandle {
    pub fn fixed(policy: Policy) -> PolicyHandle {
        PolicyHandle {
            current: Arc::new(RwLock::new(Arc::new(policy))),
        }
    }

    pub fn current(&self) -> Arc<Policy> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Loads `file` now (an error stops the agent) and checks it every
    /// `interval` until the tasks stop, as the background task
    /// `authz-policy-reloader`: a changed file that loads replaces the
    /// policy; one that does not is logged once and counted, and the
    /// previous policy stays.
    pub fn watch(
        file: PathBuf,
        interval: Duration,
        metrics: AuthzMetrics,
        tasks: &crate::tasks::Tasks,
    ) -> Result<PolicyHandle, PolicyError> {
        let policy = Policy::load(&file)?;
        tracing::info!(file = %file.display(), rules = policy.rules.len(), "authorization policy loaded");
        let handle = PolicyHandle::fixed(policy);
        let current = handle.current.clone();
        let mut seen = std::fs::read(&file).ok();
        let stop = tasks.stop().clone();
        tasks.spawn("authz-policy-reloader", async move {
            let mut ticker = tokio::time::interval(interval);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = ticker.tick() => {}
                }
                let now = std::fs::read(&file).ok();
                if now == seen {
                    continue;
                }
                seen = now;
                match Policy::load(&file) {
                    Ok(policy) => {
                        let rules = policy.rules.len();
                        *current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(policy);
                        metrics.policy_invalid.set(0);
                        tracing::info!(file = %file.display(), rules, "authorization policy reloaded");
                    }
                    Err(error) => {
                        metrics.policy_reload_failures.inc();
                        metrics.policy_invalid.set(1);
                        tracing::error!(%error, "authorization policy file changed but does not load; keeping the previous policy");
                    }
                }
            }
        });
        Ok(handle)
    }
}

// ---------------------------------------------------------------------------
// The layer

/// The caller of a request that passed the role check; handlers read it
/// from the request's extensions.
#[derive(Debug, Clone)]
pub struct Caller {
    /// `CN=persys-scheduler`, or what stands for a caller without one.
    pub identity: Arc<str>,
    pub role: Role,
}

impl Caller {
    /// The caller of `request`, if the authorization layer let it through.
    pub fn of<T>(request: &tonic::Request<T>) -> Option<&Caller> {
        request.extensions().get::<Caller>()
    }
}

/// How callers prove who they are on this listener.
#[derive(Clone)]
pub enum Authentication {
    /// Mutual TLS: identities from client certificates, roles from the policy.
    MutualTls(PolicyHandle),
    /// Plaintext (development only): nobody is identified, everybody is an
    /// operator.
    Plaintext,
}

/// The identity plaintext callers are recorded as.
pub const PLAINTEXT_IDENTITY: &str = "unauthenticated (plaintext gRPC)";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeniedLabels {
    /// A known method name, or `unknown`: never the raw path.
    pub rpc: String,
    /// The caller's role, or `none`: never the raw identity.
    pub role: String,
}

/// What authorization counts.
#[derive(Clone, Debug, Default)]
pub struct AuthzMetrics {
    pub denied: Family<DeniedLabels, Counter>,
    pub policy_reload_failures: Counter,
    /// 1 while the policy file on disk does not load (the previous policy
    /// is in force).
    pub policy_invalid: Gauge,
}

impl AuthzMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "authz_denied",
            "Calls refused by the role check, by RPC and role",
            self.denied.clone(),
        );
        registry.register(
            "authz_policy_reload_failures",
            "Changes of the authorization policy file that did not load",
            self.policy_reload_failures.clone(),
        );
        registry.register(
            "authz_policy_invalid",
            "1 while the authorization policy file does not load and the previous policy stays in force",
            self.policy_invalid.clone(),
        );
    }
}

/// Logs each refused identity at most once per [`DENIED_LOG_EVERY`].
struct DeniedLog {
    last: HashMap<String, Instant>,
}

const DENIED_LOG_EVERY: Duration = Duration::from_secs(60);
/// Identities remembered for the log's rate limit; past it, entries older
/// than the period are forgotten (and, if all are recent, the map is
/// cleared rather than grown).
const DENIED_LOG_CAPACITY: usize = 1024;

impl DeniedLog {
    fn should_log(&mut self, identity: &str, now: Instant) -> bool {
        if let Some(at) = self.last.get(identity)
            && now.duration_since(*at) < DENIED_LOG_EVERY
        {
            return false;
        }
        if self.last.len() >= DENIED_LOG_CAPACITY {
            self.last
                .retain(|_, at| now.duration_since(*at) < DENIED_LOG_EVERY);
            if self.last.len() >= DENIED_LOG_CAPACITY {
                self.last.clear();
            }
        }
        self.last.insert(identity.to_string(), now);
        true
    }
}

/// The role check in front of every service.
#[derive(Clone)]
pub struct AuthzLayer {
    shared: Arc<Shared>,
}

struct Shared {
    authentication: Authentication,
    metrics: AuthzMetrics,
    /// A std mutex: held for a map lookup, only on refusals.
    denied_log: Mutex<DeniedLog>,
}

impl AuthzLayer {
    pub fn new(authentication: Authentication, metrics: AuthzMetrics) -> AuthzLayer {
        AuthzLayer {
            shared: Arc::new(Shared {
                authentication,
                metrics,
                denied_log: Mutex::new(DeniedLog {
                    last: HashMap::new(),
                }),
            }),
        }
    }
}

impl<S> tower::Layer<S> for AuthzLayer {
    type Service = AuthzService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AuthzService {
            inner,
            shared: self.shared.clone(),
        }
    }
}

#[derive(Clone)]
pub struct AuthzService<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl Shared {
    /// The caller of a request (none for a health check without a role),
    /// or the refusal to answer it with.
    fn authorize<B>(&self, request: &http::Request<B>) -> Result<Option<Caller>, tonic::Status> {
        let rpc = Rpc::from_path(request.uri().path());
        let policy = match &self.authentication {
            Authentication::Plaintext => {
                return Ok(Some(Caller {
                    identity: Arc::from(PLAINTEXT_IDENTITY),
                    role: Role::Operator,
                }));
            }
            Authentication::MutualTls(policy) => policy,
        };
        let Some(PeerIdentity(identity)) = request.extensions().get::<PeerIdentity>() else {
            // Every mTLS connection carries one; fail closed if not.
            return Err(self.refuse(&rpc, "an unidentified caller", None, "no client identity"));
        };
        let decision = policy.current().decide(identity);
        let name = identity.to_string();
        match decision.role {
            Some(role) if role.allows(&rpc) => Ok(Some(Caller {
                identity: Arc::from(name),
                role,
            })),
            // Open to every verified certificate, with or without a role:
            // it says only whether the agent serves.
            None if rpc == Rpc::Health => Ok(None),
            Some(role) => {
                let why = format!(
                    "role {role} from {}; it allows {}",
                    decision.rule,
                    role.allowed_list()
                );
                Err(self.refuse(&rpc, &name, Some(role), &why))
            }
            None => Err(self.refuse(&rpc, &name, None, &decision.rule)),
        }
    }

    fn refuse(&self, rpc: &Rpc, identity: &str, role: Option<Role>, why: &str) -> tonic::Status {
        let role_name = role.map_or("none", Role::name);
        self.metrics
            .denied
            .get_or_create(&DeniedLabels {
                rpc: rpc.label().to_string(),
                role: role_name.to_string(),
            })
            .inc();
        let who = match role {
            Some(role) => format!("{identity} (role {role})"),
            None => format!("{identity} (no role)"),
        };
        let message = format!("{who} may not call {rpc}: {why}");
        let log = self
            .denied_log
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .should_log(identity, Instant::now());
        if log {
            tracing::warn!(%message, "call refused (logged once a minute per identity)");
        }
        tonic::Status::permission_denied(message)
    }
}

impl<S, B, R> tower::Service<http::Request<B>> for AuthzService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Send + 'static,
    R: Default + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        match self.shared.authorize(&request) {
            Ok(caller) => {
                if let Some(caller) = caller {
                    request.extensions_mut().insert(caller);
                }
                // The ready service handles this call; a fresh clone waits
                // for the next.
                let clone = self.inner.clone();
                let mut inner = std::mem::replace(&mut self.inner, clone);
                Box::pin(async move { inner.call(request).await })
            }
            Err(status) => Box::pin(futures::future::ready(Ok(status.into_http()))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(cn: &str) -> Identity {
        Identity {
            cn: Some(cn.into()),
            ..Identity::default()
        }
    }

    #[test]
    fn the_default_policy_knows_the_platform_certificates_and_nobody_else() {
        let policy = Policy::default_policy();
        assert_eq!(
            policy.decide(&identity("persys-scheduler")).role,
            Some(Role::Scheduler)
        );
        assert_eq!(
            policy.decide(&identity("persysctl")).role,
            Some(Role::Operator)
        );
        for other in ["compute-agent", "persys-agent", "persysctl2", "", "*"] {
            assert_eq!(policy.decide(&identity(other)).role, None, "{other}");
        }
        assert_eq!(policy.decide(&Identity::default()).role, None);
    }

    #[test]
    fn roles_follow_the_table() {
        let rpc = |name: &str| Rpc::from_path(&format!("/{AGENT_SERVICE}/{name}"));
        for name in SCHEDULER_RPCS {
            assert!(Role::Scheduler.allows(&rpc(name)), "{name}");
            assert!(Role::Operator.allows(&rpc(name)), "{name}");
        }
        for name in ["ApplyWorkload", "DeleteWorkload"] {
            assert!(!Role::Viewer.allows(&rpc(name)), "{name}");
        }
        for name in VIEWER_RPCS {
            assert!(Role::Viewer.allows(&rpc(name)), "{name}");
        }
        assert!(Role::Operator.allows(&rpc("StreamLogs")));
        assert!(!Role::Scheduler.allows(&rpc("StreamLogs")));
        assert!(Role::Viewer.allows(&rpc("StreamLogs")));
        assert!(!Role::Viewer.allows(&rpc("Exec")));
        assert!(!Role::Viewer.allows(&rpc("Console")));
        assert!(!Role::Scheduler.allows(&rpc("Exec")));
        assert!(Role::Operator.allows(&rpc("Exec")));
        assert!(Role::Operator.allows(&rpc("Console")));
        let health = Rpc::from_path("/grpc.health.v1.Health/Check");
        let reflection =
            Rpc::from_path("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo");
        for role in [Role::Scheduler, Role::Operator, Role::Viewer] {
            assert!(role.allows(&health));
        }
        assert!(Role::Operator.allows(&reflection));
        assert!(Role::Viewer.allows(&reflection));
        assert!(!Role::Scheduler.allows(&reflection));
        assert!(!Role::Viewer.allows(&Rpc::from_path("/other.Service/Call")));
    }

    #[test]
    fn metric_labels_are_known_names_or_unknown() {
        assert_eq!(
            Rpc::from_path("/persys.agent.v1.AgentService/ApplyWorkload").label(),
            "ApplyWorkload"
        );
        assert_eq!(
            Rpc::from_path("/persys.agent.v1.AgentService/x-random-1234").label(),
            "unknown"
        );
        assert_eq!(Rpc::from_path("/evil/path").label(), "unknown");
    }

    #[test]
    fn a_policy_file_matches_first_rule_first_with_globs_on_every_name_kind() {
        let policy = Policy::parse(
            "# who may do what\n\
             rules:\n\
             \x20 - match: {cn: persys-scheduler}\n\
             \x20   role: scheduler\n\
             \x20 - match: {uri: \"spiffe://persys/ns/*/sa/dashboard\"}\n\
             \x20   role: viewer\n\
             \x20 - match: {cn: \"ops-*\", ou: platform}\n\
             \x20   role: operator\n\
             \x20 - match: {dns: \"*.blocked.example\"}\n\
             \x20   role: deny\n\
             \x20 - match: {dns: \"*.example\"}\n\
             \x20   role: viewer\n",
            "authz.yaml",
        )
        .unwrap();
        let dashboard = Identity {
            uri: vec!["spiffe://persys/ns/monitoring/sa/dashboard".into()],
            ..Identity::default()
        };
        let decision = policy.decide(&dashboard);
        assert_eq!(decision.role, Some(Role::Viewer));
        assert_eq!(decision.rule, "rule 2 (authz.yaml:5)");
        let ops = Identity {
            cn: Some("ops-alice".into()),
            ou: vec!["finance".into(), "platform".into()],
            ..Identity::default()
        };
        assert_eq!(policy.decide(&ops).role, Some(Role::Operator));
        let ops_elsewhere = Identity {
            ou: vec!["finance".into()],
            ..ops.clone()
        };
        assert_eq!(policy.decide(&ops_elsewhere).role, None);
        let blocked = Identity {
            dns: vec!["a.blocked.example".into()],
            ..Identity::default()
        };
        let decision = policy.decide(&blocked);
        assert_eq!(decision.role, None);
        assert_eq!(decision.rule, "rule 4 (authz.yaml:9)");
        let fine = Identity {
            dns: vec!["a.example".into()],
            ..Identity::default()
        };
        assert_eq!(policy.decide(&fine).role, Some(Role::Viewer));
        // A policy file replaces the default: persysctl is not listed here.
        assert_eq!(policy.decide(&identity("persysctl")).role, None);
    }

    #[test]
    fn a_bad_policy_file_names_the_file_and_line() {
        for (text, line, words) in [
            (
                "rules:\n  - match: {cn: a}\n    role: admin\n",
                "authz.yaml:2",
                "admin",
            ),
            (
                "rules:\n  - match: {cn: a}\n    role: viewer\n  - match: {}\n    role: viewer\n",
                "authz.yaml:4",
                "at least one of cn, ou, dns, uri",
            ),
            (
                "rules:\n  - match: {cn: a, email: b}\n    role: viewer\n",
                "authz.yaml:2",
                "email",
            ),
            (
                "rules:\n  - match: {cn: \"[a\"}\n    role: viewer\n",
                "authz.yaml:2",
                "not a valid pattern",
            ),
            ("rules: [\n", "authz.yaml:", ""),
            ("roles: []\n", "authz.yaml:1", "roles"),
        ] {
            let error = Policy::parse(text, "authz.yaml").unwrap_err().to_string();
            assert!(
                error.starts_with(line),
                "{error:?} should start with {line}"
            );
            assert!(error.contains(words), "{error:?} should mention {words}");
        }
    }

    #[test]
    fn a_refused_identity_is_logged_once_a_minute() {
        let mut log = DeniedLog {
            last: HashMap::new(),
        };
        let start = Instant::now();
        assert!(log.should_log("CN=a", start));
        assert!(!log.should_log("CN=a", start + Duration::from_secs(59)));
        assert!(log.should_log("CN=b", start + Duration::from_secs(1)));
        assert!(log.should_log("CN=a", start + Duration::from_secs(61)));
        for i in 0..(2 * DENIED_LOG_CAPACITY) {
            log.should_log(&format!("CN={i}"), start);
        }
        assert!(log.last.len() <= DENIED_LOG_CAPACITY);
    }
}
