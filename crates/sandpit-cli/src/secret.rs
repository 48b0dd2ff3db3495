//! `sandpit secret`: fills the managed secret stores that sandpitd's
//! config names (`[secret_stores.NAME] kind = "managed"`). Values come from
//! standard input only (never an argument, which `ps` shows), read without
//! echo from a terminal; nothing here ever prints one.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use sandpit_secrets::{ManagedStore, SecretValue, StoreConfig, StoreKind, MAX_SECRET_BYTES};

#[derive(Args, Debug)]
pub(crate) struct SecretArgs {
    /// sandpitd's TOML config, whose `[secret_stores]` say where each store
    /// and its key are.
    #[arg(
        long,
        env = "SANDPIT_CONFIG",
        default_value = "/etc/sandpit/sandpitd.toml"
    )]
    config: PathBuf,
    #[command(subcommand)]
    command: SecretCommand,
}

#[derive(Subcommand, Debug)]
enum SecretCommand {
    /// Store a secret; its value is read from standard input (one trailing
    /// newline dropped). Creates the store and its key on first use.
    Set {
        /// The managed store.
        store: String,
        /// The secret's name (what `Secret(name=...)` asks for).
        name: String,
    },
    /// List a store's secret names (never their values).
    Ls {
        /// The managed store.
        store: String,
        /// Print one JSON array of `{"store", "name"}` objects.
        #[arg(long)]
        json: bool,
    },
    /// Remove secrets.
    Rm {
        /// The managed store.
        store: String,
        /// Secret names.
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Re-encrypt every secret of a store under a new key, which then
    /// replaces the old one.
    RotateKey {
        /// The managed store.
        store: String,
    },
}

/// The `[secret_stores]` of a sandpitd config file.
fn stores(path: &Path) -> Result<BTreeMap<String, StoreConfig>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    let mut table: toml::Table =
        toml::from_str(&text).with_context(|| format!("parse {}", path.display()))?;
    let stores: BTreeMap<String, StoreConfig> = match table.remove("secret_stores") {
        Some(value) => value
            .try_into()
            .with_context(|| format!("parse [secret_stores] of {}", path.display()))?,
        None => BTreeMap::new(),
    };
    for (name, store) in &stores {
        if let Err(why) = store.validate(name) {
            bail!("[secret_stores] of {}: {why}", path.display());
        }
    }
    Ok(stores)
}

fn managed(config: &Path, name: &str) -> Result<ManagedStore> {
    let stores = stores(config)?;
    let Some(store) = stores.get(name) else {
        let known: Vec<&str> = stores.keys().map(String::as_str).collect();
        bail!(
            "no secret store {name:?} in {} (stores: {})",
            config.display(),
            if known.is_empty() {
                "none".into()
            } else {
                known.join(", ")
            }
        );
    };
    match (store.kind, store.managed(name)) {
        (StoreKind::Managed, Some(m)) => Ok(m),
        _ => bail!(
            "store {name:?} is a directory store: its secrets are the files under {}",
            store.dir.display()
        ),
    }
}

/// The value on standard input: typed without echo on a terminal, else
/// everything until end of file.
fn read_value(name: &str) -> Result<SecretValue> {
    let stdin = std::io::stdin();
    let mut text = String::new();
    if stdin.is_terminal() {
        eprint!("value of {name} (not echoed): ");
        std::io::stderr().flush().ok();
        let _restore = NoEcho::new(&stdin)?;
        stdin.read_line(&mut text).context("read value")?;
        eprintln!();
    } else {
        stdin
            .lock()
            .take(MAX_SECRET_BYTES as u64 + 2)
            .read_to_string(&mut text)
            .context("read value from stdin (UTF-8 text)")?;
    }
    let value = sandpit_secrets::strip_newline(text);
    if value.is_empty() {
        bail!("empty value on stdin");
    }
    Ok(value)
}

/// Terminal echo off until dropped.
struct NoEcho {
    fd: std::os::fd::OwnedFd,
    saved: nix::sys::termios::Termios,
}

impl NoEcho {
    fn new(stdin: &std::io::Stdin) -> Result<Self> {
        use nix::sys::termios::{tcgetattr, tcsetattr, LocalFlags, SetArg};
        use std::os::fd::AsFd;
        let fd = stdin.as_fd().try_clone_to_owned().context("stdin")?;
        let saved = tcgetattr(&fd).context("read terminal settings")?;
        let mut quiet = saved.clone();
        quiet.local_flags.remove(LocalFlags::ECHO);
        tcsetattr(&fd, SetArg::TCSANOW, &quiet).context("turn echo off")?;
        Ok(Self { fd, saved })
    }
}

impl Drop for NoEcho {
    fn drop(&mut self) {
        let _ =
            nix::sys::termios::tcsetattr(&self.fd, nix::sys::termios::SetArg::TCSANOW, &self.saved);
    }
}

pub(crate) fn run(args: SecretArgs) -> Result<()> {
    let chain = |e: sandpit_secrets::ManagedError| anyhow::anyhow!(sandpit_errors::chain(&e));
    match args.command {
        SecretCommand::Set { store, name } => {
            let m = managed(&args.config, &store)?;
            sandpit_secrets::managed::check_name(&name)
                .map_err(|why| anyhow::anyhow!("{name:?} is not a valid secret name: {why}"))?;
            let value = read_value(&name)?;
            m.set(&name, &value).map_err(chain)?;
            println!("set {name} in {store}");
        }
        SecretCommand::Ls { store, json } => {
            let names = managed(&args.config, &store)?.list().map_err(chain)?;
            if json {
                let entries: Vec<_> = names
                    .iter()
                    .map(|name| serde_json::json!({ "store": store, "name": name }))
                    .collect();
                println!("{}", serde_json::Value::Array(entries));
            } else {
                for name in names {
                    println!("{name}");
                }
            }
        }
        SecretCommand::Rm { store, names } => {
            let m = managed(&args.config, &store)?;
            for name in names {
                m.remove(&name).map_err(chain)?;
                println!("removed {name} from {store}");
            }
        }
        SecretCommand::RotateKey { store } => {
            let m = managed(&args.config, &store)?;
            let n = m.rotate_key().map_err(chain)?;
            println!(
                "re-encrypted {n} secrets of {store} under a new key in {}",
                m.key_file().display()
            );
        }
    }
    Ok(())
}
