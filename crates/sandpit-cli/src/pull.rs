//! `sandpit image pull`: a registry pull into the local store, with a
//! progress bar on a terminal and one line per layer otherwise.

use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use sandpit_image::Reference;
use sandpit_registry::{Credentials, Progress, Puller, RegistryConfig};

use crate::{human_size, open_store, short_id};

#[derive(Args, Debug)]
pub(crate) struct PullArgs {
    /// Image reference, e.g. `python:3.11` or `ghcr.io/org/app@sha256:...`.
    reference: String,
    /// sandpitd's TOML config: its `[registry]` table (mirrors, plain-HTTP
    /// registries, credentials, size caps) applies to this pull too.
    #[arg(long, env = "SANDPIT_CONFIG")]
    config: Option<PathBuf>,
    /// User name for the image's registry (overrides the config's).
    #[arg(long, requires = "password_stdin")]
    username: Option<String>,
    /// Read the password or token from standard input.
    #[arg(long, requires = "username")]
    password_stdin: bool,
    /// No progress output; print only the result.
    #[arg(long, short)]
    quiet: bool,
}

/// The `[registry]` table of a sandpitd config file, or the defaults.
pub(crate) fn registry_config(path: Option<&Path>) -> Result<RegistryConfig> {
    let Some(path) = path else {
        return Ok(RegistryConfig::default());
    };
    let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    let mut table: toml::Table =
        toml::from_str(&text).with_context(|| format!("parse {}", path.display()))?;
    let config: RegistryConfig = match table.remove("registry") {
        Some(value) => value
            .try_into()
            .with_context(|| format!("parse [registry] of {}", path.display()))?,
        None => RegistryConfig::default(),
    };
    config
        .validate()
        .with_context(|| format!("[registry] of {}", path.display()))?;
    Ok(config)
}

pub(crate) fn pull(data_dir: &Path, args: PullArgs) -> Result<()> {
    let reference = Reference::parse(&args.reference)?;
    let config = registry_config(args.config.as_deref())?;
    let credentials = match args.username {
        Some(username) => {
            let mut password = String::new();
            std::io::stdin()
                .take(64 << 10)
                .read_to_string(&mut password)
                .context("read password from stdin")?;
            let password = password.trim_end_matches(['\n', '\r']).to_owned();
            if password.is_empty() {
                bail!("empty password on stdin");
            }
            Some(Credentials { username, password })
        }
        None => None,
    };
    let store = Arc::new(open_store(data_dir)?);
    let puller = Puller::new(Arc::clone(&store), config)?;
    let display = Mutex::new(Display::new(
        !args.quiet && std::io::stderr().is_terminal(),
        args.quiet,
    ));
    let started = Instant::now();
    let result = puller.pull(&reference, credentials.as_ref(), &|p: &Progress| {
        display.lock().unwrap_or_else(|e| e.into_inner()).update(p)
    });
    display.lock().unwrap_or_else(|e| e.into_inner()).finish();
    let image = result?;
    println!(
        "{}  {}  {} layers  {}  pulled in {:.1}s",
        image.reference,
        short_id(image.id.as_str()),
        image.layers.len(),
        human_size(image.size_bytes),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// What the terminal shows.
struct Display {
    bar: bool,
    quiet: bool,
    layers: Vec<LayerState>,
    last_draw: Option<Instant>,
    drawn: bool,
}

#[derive(Clone, Default)]
struct LayerState {
    digest: String,
    total: u64,
    done: u64,
    finished: bool,
    cached: bool,
}

impl Display {
    fn new(bar: bool, quiet: bool) -> Self {
        Self {
            bar,
            quiet,
            layers: Vec::new(),
            last_draw: None,
            drawn: false,
        }
    }

    fn update(&mut self, progress: &Progress) {
        if self.quiet {
            return;
        }
        match progress {
            Progress::Waiting => eprintln!("waiting for a pull of the same image in progress"),
            Progress::Resolved {
                endpoint,
                manifest_digest,
                layers,
            } => {
                self.layers = layers
                    .iter()
                    .map(|l| LayerState {
                        digest: l.digest.to_string(),
                        total: l.size,
                        ..Default::default()
                    })
                    .collect();
                let total: u64 = layers.iter().map(|l| l.size).sum();
                eprintln!(
                    "resolved {manifest_digest} from {endpoint}: {} layers, {}",
                    layers.len(),
                    human_size(total)
                );
            }
            Progress::LayerCached { index } => {
                if let Some(l) = self.layers.get_mut(*index) {
                    l.cached = true;
                    l.finished = true;
                    l.done = l.total;
                    let line = format!("{}: already present", short_digest(&l.digest));
                    self.line(&line);
                }
            }
            Progress::LayerBytes { index, done, total } => {
                if let Some(l) = self.layers.get_mut(*index) {
                    l.done = *done;
                    if *total > 0 {
                        l.total = *total;
                    }
                }
                self.draw(false);
            }
            Progress::LayerDone { index } => {
                if let Some(l) = self.layers.get_mut(*index) {
                    l.finished = true;
                    l.done = l.total;
                    let line = format!(
                        "{}: pulled ({})",
                        short_digest(&l.digest),
                        human_size(l.total)
                    );
                    self.line(&line);
                }
            }
            _ => {}
        }
    }

    /// A line that stays, above the bar.
    fn line(&mut self, text: &str) {
        let mut err = std::io::stderr().lock();
        if self.drawn {
            let _ = write!(err, "\r\x1b[2K");
            self.drawn = false;
        }
        let _ = writeln!(err, "{text}");
        drop(err);
        self.draw(true);
    }

    fn draw(&mut self, force: bool) {
        if !self.bar || self.layers.is_empty() {
            return;
        }
        // Redrawing on every chunk would cost more than the pull.
        if !force
            && self
                .last_draw
                .is_some_and(|t| t.elapsed() < Duration::from_millis(100))
        {
            return;
        }
        self.last_draw = Some(Instant::now());
        let total: u64 = self.layers.iter().map(|l| l.total).sum();
        let done: u64 = self.layers.iter().map(|l| l.done.min(l.total)).sum();
        let finished = self.layers.iter().filter(|l| l.finished).count();
        const WIDTH: usize = 30;
        let filled = if total == 0 {
            WIDTH
        } else {
            ((done as f64 / total as f64) * WIDTH as f64) as usize
        };
        let mut err = std::io::stderr().lock();
        let _ = write!(
            err,
            "\r\x1b[2K[{}{}] {} / {}  {finished}/{} layers",
            "#".repeat(filled.min(WIDTH)),
            ".".repeat(WIDTH - filled.min(WIDTH)),
            human_size(done),
            human_size(total),
            self.layers.len()
        );
        let _ = err.flush();
        self.drawn = true;
    }

    fn finish(&mut self) {
        if self.drawn {
            eprint!("\r\x1b[2K");
            self.drawn = false;
        }
    }
}

fn short_digest(digest: &str) -> &str {
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    &hex[..hex.len().min(12)]
}
