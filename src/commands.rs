//! One-shot commands of the `persys-agent` binary (`persys-agent authz
//! check …`, `persys-agent store rotate-key`, `persys-agent store check`,
//! `persys-agent policy show`, `persys-agent import --from …`): each
//! returns the process's exit status.

use crate::config::{AuthzCommand, Command, Config, PolicyCommand, StoreCommand};
use crate::server::authz::{Identity, Policy};

/// Runs `command`; the exit status follows the command's own rules.
pub fn run(config: &Config, command: &Command) -> i32 {
    // PERSYS_STATE_PATH may name the Go agent's state.db: the state
    // directory is then the one beside it.
    let mut config = config.clone();
    if let Err(error) = crate::import::resolve(&mut config) {
        eprintln!("persys-agent: {error}");
        return 1;
    }
    let config = &config;
    match command {
        Command::Import { from, dry_run } => import(config, from, *dry_run),
        Command::Authz {
            action: AuthzCommand::Check { cert },
        } => authz_check(config, cert),
        Command::Store {
            action: StoreCommand::RotateKey,
        } => rotate_key(config),
        Command::Store {
            action: StoreCommand::Check,
        } => store_check(config),
        Command::Policy {
            action: PolicyCommand::Show,
        } => policy_show(config),
    }
}

/// Imports (or, in a dry run, shows what would be imported from) the Go
/// agent's state file into the configured state directory. 0 when every
/// workload is imported, 3 when some are refused, 1 on an error, 2 on a bad
/// policy.
fn import(config: &Config, from: &std::path::Path, dry_run: bool) -> i32 {
    let policy = match crate::policy::load(config) {
        Ok(policy) => std::sync::Arc::new(policy),
        Err(error) => {
            eprintln!("persys-agent: invalid workload policy: {error}");
            return 2;
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("persys-agent: cannot start the runtime: {error}");
            return 1;
        }
    };
    let result = runtime.block_on(crate::import::command(config, &policy, from, dry_run));
    match result {
        Ok(report) => {
            if dry_run {
                println!(
                    "persys-agent: dry run: nothing was changed. Importing {} into {} would do:",
                    from.display(),
                    config.state_path.display()
                );
            }
            print!("{}", report.table());
            if report.refused() > 0 { 3 } else { 0 }
        }
        Err(error) => {
            eprintln!("persys-agent: {error}");
            1
        }
    }
}

/// Prints the workload policy in force; 2 when it cannot be loaded.
fn policy_show(config: &Config) -> i32 {
    match crate::policy::load(config) {
        Ok(policy) => {
            print!("{}", crate::policy::show(&policy, config));
            0
        }
        Err(error) => {
            eprintln!("persys-agent: invalid workload policy: {error}");
            2
        }
    }
}

/// Re-seals the store under a new key (offline: the store's lock refuses
/// while the agent runs). 0 when done, 1 with the reason otherwise.
fn rotate_key(config: &Config) -> i32 {
    let mut store = crate::store::StoreConfig::new(&config.state_path);
    store.key_file = config.state_key_file();
    match crate::store::rotate_key(&store) {
        Ok(report) => {
            println!("persys-agent: {report}");
            0
        }
        Err(error) => {
            eprintln!("persys-agent: {error}");
            1
        }
    }
}

/// Verifies the state directory offline. 0 when sound; 1 naming each
/// problem, or why it could not be checked.
fn store_check(config: &Config) -> i32 {
    let mut store = crate::store::StoreConfig::new(&config.state_path);
    store.key_file = config.state_key_file();
    let path = config.state_path.display();
    match crate::store::check(&store) {
        Ok(report) if report.is_sound() => {
            println!("persys-agent: state directory {path} is sound: {report}");
            0
        }
        Ok(report) => {
            println!("persys-agent: state directory {path}: {report}");
            eprintln!(
                "persys-agent: state directory {path} is NOT sound ({} problems):",
                report.problems.len()
            );
            for problem in &report.problems {
                eprintln!("  {problem}");
            }
            eprintln!(
                "Restore the state directory from a backup, or move it aside and let the agent start empty (the scheduler applies its workloads again)."
            );
            1
        }
        Err(error) => {
            eprintln!("persys-agent: state directory {path} cannot be checked: {error}");
            1
        }
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
