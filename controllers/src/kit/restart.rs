//! Restarts are the agent's job, not the engine's: containers, and the
//! containers of compose services, run with the engine's restart policy
//! `no`, and this module decides whether one that exited starts again; when
//! is the crash loop's job (`crash_loop.rs`). The rule reads the policy
//! names both the container spec and a compose file use.

use std::fmt;

use persys_api::v1::ContainerSpec;

/// What the spec's `restart_policy` asks for when a container exits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestartRule {
    /// Restart whatever the exit code: `always`, `unless-stopped` (the
    /// desired state is how a workload is stopped) and the default.
    Always,
    /// Restart after a non-zero exit code; with `max_restarts` > 0, at most
    /// that many times.
    OnFailure { max_restarts: u32 },
    /// `no`: an exited container stays exited.
    Never,
}

/// What becomes of an exited container.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitDecision {
    /// Start it again (once the crash-loop backoff allows).
    Restart,
    /// It finished successfully and is not restarted.
    Completed,
    /// It failed and is not restarted: the policy is `no`, or on-failure's
    /// limit was reached.
    GaveUp { limit_reached: bool },
}

impl RestartRule {
    /// The policy name alone (`max_retry_count` applies separately).
    pub fn parse(policy: &str) -> Option<RestartRule> {
        match policy.to_ascii_lowercase().as_str() {
            "" | "always" | "unless-stopped" => Some(RestartRule::Always),
            "on-failure" => Some(RestartRule::OnFailure { max_restarts: 0 }),
            "no" | "never" => Some(RestartRule::Never),
            _ => None,
        }
    }

    /// A compose service's `restart` value (`no`, `always`,
    /// `unless-stopped`, `on-failure`, `on-failure:N`). Compose's default,
    /// when the file says nothing, is the caller's to choose.
    pub fn parse_compose(policy: &str) -> Option<RestartRule> {
        let (name, count) = match policy.trim().split_once(':') {
            Some((name, count)) => (name, Some(count.trim())),
            None => (policy.trim(), None),
        };
        match (RestartRule::parse(name)?, count) {
            (rule, None) if !name.is_empty() => Some(rule),
            (RestartRule::OnFailure { .. }, Some(count)) => Some(RestartRule::OnFailure {
                max_restarts: count.parse().ok()?,
            }),
            _ => None,
        }
    }

    /// The rule of a (validated) spec.
    pub fn of(spec: &ContainerSpec) -> RestartRule {
        let Some(policy) = &spec.restart_policy else {
            return RestartRule::Always;
        };
        match RestartRule::parse(&policy.policy) {
            Some(RestartRule::OnFailure { .. }) => RestartRule::OnFailure {
                max_restarts: policy.max_retry_count.max(0) as u32,
            },
            Some(rule) => rule,
            None => RestartRule::Always,
        }
    }

    /// Whether a container that exited with `exit_code`, after `restarts`
    /// restarts of its spec, is started again.
    pub fn decide(&self, exit_code: i64, restarts: i32) -> ExitDecision {
        match *self {
            RestartRule::Always => ExitDecision::Restart,
            RestartRule::Never if exit_code == 0 => ExitDecision::Completed,
            RestartRule::Never => ExitDecision::GaveUp {
                limit_reached: false,
            },
            RestartRule::OnFailure { .. } if exit_code == 0 => ExitDecision::Completed,
            RestartRule::OnFailure { max_restarts }
                if max_restarts > 0 && restarts >= max_restarts as i32 =>
            {
                ExitDecision::GaveUp {
                    limit_reached: true,
                }
            }
            RestartRule::OnFailure { .. } => ExitDecision::Restart,
        }
    }
}

/// The compose spelling: what the agent records as the policy a compose
/// service asked for.
impl fmt::Display for RestartRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RestartRule::Always => f.write_str("always"),
            RestartRule::OnFailure { max_restarts: 0 } => f.write_str("on-failure"),
            RestartRule::OnFailure { max_restarts } => write!(f, "on-failure:{max_restarts}"),
            RestartRule::Never => f.write_str("no"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use persys_api::v1::RestartPolicy;

    #[test]
    fn restart_rules_follow_the_docker_policy_names() {
        let spec = |policy: &str, max: i32| ContainerSpec {
            restart_policy: Some(RestartPolicy {
                policy: policy.into(),
                max_retry_count: max,
            }),
            ..Default::default()
        };
        assert_eq!(
            RestartRule::of(&ContainerSpec::default()),
            RestartRule::Always
        );
        assert_eq!(
            RestartRule::of(&spec("unless-stopped", 0)),
            RestartRule::Always
        );
        assert_eq!(
            RestartRule::of(&spec("no", 0)).decide(0, 0),
            ExitDecision::Completed
        );
        assert_eq!(
            RestartRule::of(&spec("no", 0)).decide(1, 0),
            ExitDecision::GaveUp {
                limit_reached: false
            }
        );
        let on_failure = RestartRule::of(&spec("on-failure", 2));
        assert_eq!(on_failure.decide(0, 0), ExitDecision::Completed);
        assert_eq!(on_failure.decide(1, 1), ExitDecision::Restart);
        assert_eq!(
            on_failure.decide(1, 2),
            ExitDecision::GaveUp {
                limit_reached: true
            }
        );
        assert_eq!(RestartRule::Always.decide(0, 100), ExitDecision::Restart);
    }

    #[test]
    fn compose_policies_read_with_their_retry_count_and_print_back_as_written() {
        for (text, rule) in [
            ("no", RestartRule::Never),
            ("always", RestartRule::Always),
            ("unless-stopped", RestartRule::Always),
            ("on-failure", RestartRule::OnFailure { max_restarts: 0 }),
            ("on-failure:3", RestartRule::OnFailure { max_restarts: 3 }),
        ] {
            assert_eq!(RestartRule::parse_compose(text), Some(rule), "{text}");
        }
        for bad in ["", "sometimes", "always:2", "on-failure:x", "no:1"] {
            assert_eq!(RestartRule::parse_compose(bad), None, "{bad:?}");
        }
        for text in ["no", "always", "on-failure", "on-failure:3"] {
            let rule = RestartRule::parse_compose(text).unwrap();
            assert_eq!(rule.to_string(), text);
        }
    }
}
