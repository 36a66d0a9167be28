//! One-shot commands of the `persys-agent` binary (`persys-agent authz
//! check …`): each returns the process's exit status.

use crate::config::{AuthzCommand, Command, Config};
use crate::server::authz::{Identity, Policy};

/// Runs `command`; the exit status follows the command's own rules.
pub fn run(config: &Config, command: &Command) -> i32 {
    match command {
        Command::Authz {
            action: AuthzCommand::Check { cert },
        } => authz_check(config, cert),
    }
}

fn authz_check(config: &Config, cert: &std::path::Path) -> i32 {
    let policy = match &config.authz_file {
        Some(file) => match Policy::load(file) {
            Ok(policy) => policy,
            Err(error) => {
                eprintln!("persys-agent: invalid authorization policy: {error}");
                return 2;
            }
        },
        None => Policy::default_policy(),
    };
    let identity = match Identity::from_pem_file(cert) {
        Ok(identity) => identity,
        Err(error) => {
            eprintln!("persys-agent: {error}");
            return 2;
        }
    };
    let decision = policy.decide(&identity);
    println!("identity: {identity}");
    if let Some(cn) = &identity.cn {
        println!("  cn:  {cn}");
    }
    for (kind, values) in [
        ("ou", &identity.ou),
        ("dns", &identity.dns),
        ("uri", &identity.uri),
    ] {
        for value in values {
            println!("  {kind}: {value}");
        }
    }
    println!("policy: {}", policy.source());
    match decision.role {
        Some(role) => {
            println!("role: {role} ({})", decision.rule);
            0
        }
        None => {
            println!("role: none, every call is refused ({})", decision.rule);
            1
        }
    }
}
