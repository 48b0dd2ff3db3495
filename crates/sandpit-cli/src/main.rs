//! `sandpit`: the operator CLI. Manages the local image store, runs one-off
//! sandboxes straight on the engine (no daemon needed), and lists or stops
//! the sandboxes of a running `sandpitd`.

mod commands;
mod completions;
mod cp;
mod create;
mod exec;
mod output;
mod pull;
mod remote;
mod run;
mod secret;
mod stats;
mod term;

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use sandpit_image::{IdShift, ImageConfig, ImageStore, Reference};

#[derive(Parser, Debug)]
#[command(name = "sandpit", version, about = "Sandpit operator CLI")]
pub(crate) struct Cli {
    /// Data directory (image store and sandbox state).
    #[arg(
        long,
        global = true,
        env = "SANDPIT_DATA_DIR",
        default_value = "/var/lib/sandpit"
    )]
    data_dir: PathBuf,
    #[command(flatten)]
    server: remote::ServerArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Manage images in the local store.
    Image {
        #[command(subcommand)]
        command: ImageCommand,
    },
    /// Run a command in a new sandbox, then remove the sandbox.
    Run(run::RunArgs),
    /// Manage the secrets of sandpitd's managed secret stores.
    Secret(secret::SecretArgs),
    /// Create a sandbox through the daemon; prints its id once it runs.
    Create(create::CreateArgs),
    /// Run a command in a running sandbox; exits with its exit code.
    Exec(exec::ExecArgs),
    /// Copy files or directories between a sandbox and here (ID:PATH).
    Cp(cp::CpArgs),
    /// Print a shell completion script (bash, zsh, fish).
    Completions(completions::CompletionsArgs),
    /// Live CPU, memory, network and tasks of running sandboxes.
    Stats(stats::StatsArgs),
    /// Show a sandbox's commands: CPU time, peak memory and how each ended.
    Commands(commands::CommandsArgs),
    #[command(flatten)]
    Remote(remote::RemoteCommand),
}

#[derive(Subcommand, Debug)]
enum ImageCommand {
    /// Add a root filesystem tarball (e.g. from mmdebstrap) as an image.
    Import {
        /// Reference to store it under, e.g. `python:3.11`.
        reference: String,
        /// The tarball.
        rootfs: PathBuf,
        /// Default environment variables (`KEY=VALUE`, repeatable).
        #[arg(long = "env", short = 'e')]
        env: Vec<String>,
        /// Default working directory.
        #[arg(long, default_value = "")]
        workdir: String,
        /// Default command (the image's CMD).
        #[arg(long, num_args = 1.., allow_hyphen_values = true)]
        cmd: Vec<String>,
    },
    /// List images.
    Ls {
        /// Print one JSON array of images (see docs/ops/cli.md).
        #[arg(long)]
        json: bool,
    },
    /// Remove images and the layers no other image uses.
    Rm {
        /// References to remove.
        #[arg(required = true)]
        references: Vec<String>,
    },
    /// Remove the layers that no image and no sandbox uses.
    Gc,
    /// Pull an image from its registry into the store.
    Pull(pull::PullArgs),
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SANDPIT_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match dispatch(cli) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("sandpit: {e:#}");
            std::process::exit(125);
        }
    }
}

fn dispatch(cli: Cli) -> Result<i32> {
    match cli.command {
        Command::Image { command } => image(&cli.data_dir, command).map(|()| 0),
        Command::Run(args) => run::run(&cli.data_dir, args),
        Command::Secret(args) => secret::run(args).map(|()| 0),
        Command::Create(args) => create::run(&cli.server, &cli.data_dir, args).map(|()| 0),
        Command::Exec(args) => exec::run(&cli.server, &cli.data_dir, args),
        Command::Cp(args) => cp::run(&cli.server, &cli.data_dir, args).map(|()| 0),
        Command::Completions(args) => {
            completions::run(args);
            Ok(0)
        }
        Command::Stats(args) => stats::run(&cli.server, &cli.data_dir, args).map(|()| 0),
        Command::Commands(args) => commands::run(&cli.server, &cli.data_dir, args).map(|()| 0),
        Command::Remote(command) => remote::run(&cli.server, &cli.data_dir, command).map(|()| 0),
    }
}

pub(crate) fn open_store(data_dir: &std::path::Path) -> Result<ImageStore> {
    let dir = data_dir.join("store");
    ImageStore::open(&dir, IdShift::default())
        .with_context(|| format!("open image store {}", dir.display()))
}

fn image(data_dir: &std::path::Path, command: ImageCommand) -> Result<()> {
    let store = || open_store(data_dir);
    match command {
        ImageCommand::Import {
            reference,
            rootfs,
            env,
            workdir,
            cmd,
        } => {
            let reference = Reference::parse(&reference)?;
            for e in &env {
                if !e.contains('=') {
                    anyhow::bail!("--env {e:?}: expected KEY=VALUE");
                }
            }
            let file = std::fs::File::open(&rootfs)
                .with_context(|| format!("open {}", rootfs.display()))?;
            let started = std::time::Instant::now();
            let config = ImageConfig {
                env,
                working_dir: workdir,
                cmd,
                ..Default::default()
            };
            let image = store()?.import_rootfs_tar(&reference, file, config)?;
            println!(
                "imported {} ({}, {} in {:.1}s)",
                image.reference,
                short_id(image.id.as_str()),
                human_size(image.size_bytes),
                started.elapsed().as_secs_f64()
            );
        }
        ImageCommand::Ls { json: true } => {
            let images: Vec<_> = store()?.list()?.iter().map(output::image).collect();
            output::print(&serde_json::Value::Array(images));
        }
        ImageCommand::Ls { json: false } => {
            println!(
                "{:<48} {:<14} {:>6} {:>10}",
                "REFERENCE", "ID", "LAYERS", "SIZE"
            );
            for image in store()?.list()? {
                println!(
                    "{:<48} {:<14} {:>6} {:>10}",
                    image.reference,
                    short_id(image.id.as_str()),
                    image.layers.len(),
                    human_size(image.size_bytes)
                );
            }
        }
        ImageCommand::Rm { references } => {
            let store = store()?;
            for r in references {
                let reference = Reference::parse(&r)?;
                store.remove(&reference)?;
                println!("removed {reference}");
            }
        }
        ImageCommand::Gc => {
            // Sandboxes' layers are leased in the store: an empty `in_use`
            // still keeps them.
            let removed = store()?.gc(&std::collections::HashSet::new())?;
            for layer in &removed {
                println!("removed layer {layer}");
            }
            println!("{} layers removed", removed.len());
        }
        ImageCommand::Pull(args) => pull::pull(data_dir, args)?,
    }
    Ok(())
}

fn short_id(id: &str) -> &str {
    let hex = id.strip_prefix("sha256:").unwrap_or(id);
    &hex[..hex.len().min(12)]
}

fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_ids_print_compactly() {
        assert_eq!(human_size(512), "512 B");
        assert_eq!(human_size(1536), "1.5 KiB");
        assert_eq!(human_size(180 << 20), "180.0 MiB");
        assert_eq!(short_id("sha256:0123456789abcdef"), "0123456789ab");
        assert_eq!(short_id("abc"), "abc");
    }

    #[test]
    fn command_line_parses() {
        let cli = Cli::try_parse_from([
            "sandpit",
            "run",
            "--memory",
            "256Mi",
            "--cpus",
            "0.5",
            "python:3.11",
            "--",
            "sh",
            "-c",
            "true",
        ])
        .unwrap();
        let Command::Run(args) = cli.command else {
            panic!("not run")
        };
        assert_eq!(args.image, "python:3.11");
        assert_eq!(args.command, ["sh", "-c", "true"]);
        assert!(Cli::try_parse_from(["sandpit", "image", "rm"]).is_err());
        // A value is never an argument.
        assert!(Cli::try_parse_from(["sandpit", "secret", "set", "s", "N", "value"]).is_err());
        assert!(
            Cli::try_parse_from(["sandpit", "secret", "--config", "c", "rotate-key", "s"]).is_ok()
        );
    }
}
