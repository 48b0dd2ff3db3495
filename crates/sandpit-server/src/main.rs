//! `sandpitd`: serves sandboxes over the `coreweave.sandbox.v1` gRPC API.
//! See docs/sandpitd.md.

use std::io::{IsTerminal, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context, Result};
use clap::Parser;
use sandpit_server::auth::{generate_key, ApiKey, Auth};
use sandpit_server::clock::SystemClock;
use sandpit_server::clusterconfig::Role;
use sandpit_server::config::{Config, LogFormat, Overrides};
use sandpit_server::db::Db;
use sandpit_server::local::{LocalEngine, LocalEngineConfig};
use sandpit_server::logs::FileSink;
use sandpit_server::manager::Manager;
use sandpit_server::server::{serve_with_storage, ServerOptions};
use tokio::net::TcpListener;

/// The sandpit sandbox service (coreweave.sandbox.v1 over gRPC).
#[derive(Debug, Parser)]
#[command(name = "sandpitd", version)]
struct Args {
    /// Address to listen on [default: 127.0.0.1:50051].
    #[arg(long, value_name = "ADDR")]
    listen: Option<String>,
    /// Directory for images, sandboxes, the database and the generated key
    /// [default: /var/lib/sandpit].
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// TOML configuration file (flags override its values).
    #[arg(long, value_name = "FILE", global = true)]
    config: Option<PathBuf>,
    /// An accepted API key (repeatable); SANDPIT_API_KEYS adds more,
    /// comma-separated. Without any, a key is generated into
    /// <data-dir>/api-key.
    #[arg(long = "api-key", value_name = "KEY")]
    api_keys: Vec<String>,
    /// Log format.
    #[arg(long, value_name = "text|json")]
    log_format: Option<LogFormat>,
    /// PEM certificate chain for TLS.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key for TLS.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Allow plaintext on a non-loopback address.
    #[arg(long)]
    insecure: bool,
    /// Serve the web console on this address (enables `[console]`).
    #[arg(long, value_name = "ADDR")]
    console_listen: Option<String>,
    /// Address of the Prometheus /metrics endpoint, or "off"
    /// [default: 127.0.0.1:9464].
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<String>,
    /// Validate the configuration (file, flags, environment), print what
    /// this process would be, and exit: 0 if valid, 2 if not.
    #[arg(long)]
    check_config: bool,
    /// An operator command instead of the daemon.
    #[command(subcommand)]
    command: Option<Command>,
}

/// `sandpitd COMMAND`: operator commands (without one, the daemon runs).
#[derive(Debug, clap::Subcommand)]
enum Command {
    /// The cluster's principals (API keys) in its PostgreSQL; needs
    /// --config FILE with a [cluster] section.
    #[command(subcommand)]
    Principal(sandpit_server::principals::PrincipalCommand),
}

fn main() -> std::process::ExitCode {
    // Before the runtime's threads exist: it edits the environment.
    let notifier = sandpit_server::sd_notify::Notifier::take_from_env();
    let args = Args::parse();
    if let Some(Command::Principal(command)) = &args.command {
        let code = sandpit_server::principals::run_cli(args.config.as_deref(), command);
        return std::process::ExitCode::from(code);
    }
    let env_keys = std::env::var("SANDPIT_API_KEYS").ok();
    let overrides = Overrides {
        listen: args.listen,
        data_dir: args.data_dir,
        api_keys: args.api_keys,
        log_format: args.log_format,
        tls_cert: args.tls_cert,
        tls_key: args.tls_key,
        insecure: args.insecure,
        console_listen: args.console_listen,
        metrics_listen: args.metrics_listen,
    };
    let config = match Config::load(args.config.as_deref(), overrides, env_keys.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("sandpitd: {}", sandpit_server::chain(&e));
            return std::process::ExitCode::from(2);
        }
    };
    if args.check_config {
        // The signing CA is read at start-up only by a gateway: check it
        // here too, so a rollout does not find a key that does not parse.
        if let Some((cert, key)) = config.cluster.as_ref().and_then(|c| c.ca.as_ref()) {
            if let Err(e) = sandpit_server::direct::ClusterCa::load(cert, key) {
                eprintln!(
                    "sandpitd: invalid cluster.ca_cert_file, cluster.ca_key_file: {}",
                    sandpit_server::chain(&e)
                );
                return std::process::ExitCode::from(2);
            }
        }
        let role = match config.cluster.as_ref().map(|c| c.role) {
            None => "single host",
            Some(Role::Runner) => "cluster runner",
            Some(Role::Gateway) => "cluster gateway",
        };
        println!(
            "sandpitd: configuration valid: {role} {:?} listening on {}",
            config.runner_id, config.listen
        );
        return std::process::ExitCode::SUCCESS;
    }
    init_tracing(config.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("sandpitd: start tokio: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config, notifier)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("sandpitd: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

async fn run(config: Config, notifier: sandpit_server::sd_notify::Notifier) -> Result<()> {
    if let Some(cluster) = config.cluster.clone().filter(|c| c.role == Role::Gateway) {
        return run_gateway(config, cluster, notifier).await;
    }
    let started = SystemTime::now();
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&config.data_dir)
        .with_context(|| format!("create data dir {}", config.data_dir.display()))?;

    // Two daemons on one data dir would both adopt, and sweep, each
    // other's sandboxes. Held until the process exits.
    let _lock = lock_data_dir(&config.data_dir)?;

    let keys = if config.api_keys.is_empty() {
        vec![ApiKey {
            key: load_or_generate_key(&config.key_file())?,
            name: None,
            organization: None,
        }]
    } else {
        config.api_keys.clone()
    };
    let auth = Auth::new(&keys);

    let tls = match &config.tls {
        Some(t) => Some((
            std::fs::read(&t.cert)
                .with_context(|| format!("read TLS certificate {}", t.cert.display()))?,
            std::fs::read(&t.key).with_context(|| format!("read TLS key {}", t.key.display()))?,
        )),
        None => None,
    };

    let secret_stores = sandpit_server::secrets::SecretStores::new(config.secret_stores.clone());
    secret_stores.init_managed().map_err(|(name, e)| {
        anyhow::anyhow!(sandpit_server::chain(&e)).context(format!("secret store {name:?}"))
    })?;

    let engine_config = LocalEngineConfig {
        store_dir: config.store_dir(),
        state_dir: config.state_dir(),
        agent_binary: config.agent_binary.clone(),
        spawner_binary: config.spawner_binary.clone(),
        cgroup_parent: config.cgroup_parent.clone(),
        pids_max: config.pids_max,
        registry: config.registry.clone(),
        network: config
            .network
            .enabled
            .then(|| (config.network.clone(), config.data_dir.join("network"))),
        storage: config
            .storage
            .enabled
            .then(|| (config.storage.clone(), config.data_dir.clone())),
        disk_pool: config
            .limits
            .disk
            .default_bytes
            .filter(|_| config.limits.disk_pool > 0)
            .map(|size_bytes| sandpit_server::local::DiskPoolConfig {
                dir: config.data_dir.join("disk-pool"),
                size_bytes,
                ready: config.limits.disk_pool,
            }),
        lxcfs: {
            let mode = config.limits.lxcfs.clone();
            tokio::task::spawn_blocking(move || sandpit_server::lxcfs::ensure(&mode)).await?
        },
    };
    // The LXCFS this daemon started (not one configured by path, which is
    // the host's to run) is started again if it dies.
    let _lxcfs_watch = match (&config.limits.lxcfs, &engine_config.lxcfs) {
        (sandpit_server::limitsconfig::LxcfsMode::Auto, Some(path)) => {
            let path = path.clone();
            Some(AbortOnDrop(tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(2));
                loop {
                    tick.tick().await;
                    let path = path.clone();
                    let _ =
                        tokio::task::spawn_blocking(move || sandpit_server::lxcfs::revive(&path))
                            .await;
                }
            })))
        }
        _ => None,
    };
    let mut manager_config = config.manager.clone();
    manager_config.allocatable = allocatable(&config);
    // What this runner offers the cluster: what its own admission holds.
    let offered = sandpit_cluster::Capacity {
        cpu_millis: manager_config.allocatable.cpu_millis,
        memory_bytes: manager_config.allocatable.memory_bytes,
        sandboxes: u32::try_from(manager_config.max_sandboxes).unwrap_or(u32::MAX),
    };
    tracing::info!(
        cpu_millis = manager_config.allocatable.cpu_millis,
        memory_bytes = manager_config.allocatable.memory_bytes,
        data_dir_reserve_bytes = manager_config.allocatable.disk_reserve_bytes,
        "admitting sandboxes by their requests against"
    );
    let engine = tokio::task::spawn_blocking(move || LocalEngine::new(engine_config))
        .await?
        .map_err(|e| anyhow::anyhow!(sandpit_server::chain(&e)))
        .context("set up the engine")?;
    // The resolver and the proxy every sandbox's DNS and name-routed web
    // traffic is sent to; they end with the daemon (sandboxes' kernel rules
    // do not: a restarted daemon serves them again).
    let _egress = match engine.local_network() {
        Some(net) => Some(AbortOnDrop(
            net.serve_egress()
                .await
                .map_err(|e| anyhow::anyhow!(sandpit_server::chain(&e)))
                .context("serve sandbox DNS and egress")?,
        )),
        None => {
            tracing::info!("networking off: sandboxes get loopback only");
            None
        }
    };
    let db_path = config.db_path();
    let db = Db::open(&db_path)
        .map_err(|e| anyhow::anyhow!(sandpit_server::chain(&e)))
        .with_context(|| format!("open database {}", db_path.display()))?;
    let sink = FileSink::with_max_bytes(&config.logs_dir(), config.max_log_bytes)
        .with_context(|| format!("create {}", config.logs_dir().display()))?;
    let logs = sink.reader();
    let manager = Manager::start(
        manager_config,
        engine,
        db,
        Arc::new(SystemClock),
        Arc::new(sink),
    )
    .await
    .map_err(|e| anyhow::anyhow!(sandpit_server::chain(&e)))
    .context("start the sandbox manager")?;
    // After the start's sweep: pooled sandboxes of an earlier run were
    // debris to it, and the pools are filled afresh.
    let templates =
        sandpit_server::api::pool::templates(&manager, &config.runner_id, &config.pools)
            .map_err(|e| anyhow::anyhow!(e))
            .context("warm pools")?;
    manager.start_pool(templates);
    let pools = manager.clone();

    // A cluster runner registers before it serves: the store's verdict on
    // what it holds is applied first (membership.rs).
    // The direct data plane (ConnectSandbox): its listener first, so that
    // the endpoint registered is one that answers.
    let mut direct_info = None;
    let _direct = match config.cluster.as_ref().and_then(|c| c.direct.as_ref()) {
        Some(d) => {
            let (cert_pem, key_pem) = sandpit_server::direct::ca::server_identity(&d.host)
                .map_err(|e| anyhow::anyhow!(sandpit_server::chain(&e)))
                .context("make the direct endpoint's certificate")?;
            let listener = TcpListener::bind(d.listen)
                .await
                .with_context(|| format!("direct endpoint: listen on {}", d.listen))?;
            tracing::info!(addr = %listener.local_addr()?, advertise = %d.advertise, "direct data plane listening (mTLS)");
            direct_info = Some(sandpit_cluster::DirectEndpoint {
                uri: d.advertise.clone(),
                cert_pem: cert_pem.clone(),
            });
            let tls = sandpit_server::direct::server::DirectTls {
                cert_pem,
                key_pem,
                client_ca_pem: d.client_ca_pem.clone(),
            };
            let data = sandpit_server::api::DataPlaneOptions {
                max_file_bytes: config.max_file_bytes,
                logs: Some(logs.clone()),
                ..Default::default()
            };
            let manager = manager.clone();
            let max = config.max_message_bytes;
            Some(AbortOnDrop(tokio::spawn(async move {
                let served = sandpit_server::direct::server::serve(
                    listener,
                    manager,
                    tls,
                    max,
                    data,
                    std::future::pending(),
                )
                .await;
                if let Err(e) = served {
                    tracing::error!(error = %sandpit_server::chain(&e), "direct endpoint stopped");
                }
            })))
        }
        None => None,
    };
    let membership = match config.cluster.as_ref() {
        Some(cluster) => {
            let store = sandpit_server::membership::connect(cluster)
                .await
                .map_err(|e| anyhow::anyhow!(sandpit_server::chain(&e)))
                .context("connect to the cluster's PostgreSQL")?;
            // The store's principals, then a sync (runs until the process ends).
            let _principals = sandpit_server::principals::start(&store, &auth, cluster.lease).await;
            let m = sandpit_server::membership::Membership::join(
                store,
                cluster,
                &config.runner_id,
                offered,
                direct_info,
                &manager,
            )
            .await
            .map_err(|e| anyhow::anyhow!(sandpit_server::chain(&e)))
            .context("join the cluster")?;
            Some(AbortOnDrop::of(m.run(manager.clone())))
        }
        None => None,
    };

    let catalog_path = config.data_dir.join("storage.db");
    let catalog = sandpit_server::storage::catalog::Catalog::open(&catalog_path)
        .map_err(|e| anyhow::anyhow!(sandpit_server::chain(&e)))
        .with_context(|| format!("open {}", catalog_path.display()))?;
    let storage = sandpit_server::storage::Storage::start(
        manager.clone(),
        catalog,
        config.storage.clone(),
        config.runner_id.clone(),
    )
    .await
    .map_err(|e| anyhow::anyhow!(sandpit_server::chain(&e)))
    .context("start volumes and snapshots")?;

    let console = if config.console.enabled {
        let c = sandpit_server::console::ConsoleServer::start(
            &config.console,
            manager.clone(),
            auth.clone(),
            Some(logs.clone()),
        )
        .await
        .with_context(|| format!("console: listen on {}", config.console.listen))?;
        tracing::info!(addr = %c.local_addr(), "console listening");
        eprintln!("sandpitd console on http://{}", c.local_addr());
        Some(c)
    } else {
        None
    };
    let _metrics = serve_metrics(&config, manager.clone()).await?;

    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("listen on {}", config.listen))?;
    let addr = listener.local_addr()?;
    tracing::info!(
        %addr,
        data_dir = %config.data_dir.display(),
        runner_id = %config.runner_id,
        tls = config.tls.is_some(),
        "sandpitd listening"
    );
    // A fixed line on stderr whatever the log format: scripts wait for it.
    eprintln!("sandpitd listening on {addr}");
    // systemd's Type=notify: ready once the port answers and every
    // sandbox of the last run is adopted (Manager::start did that).
    if let Err(e) = notifier.notify("READY=1") {
        tracing::warn!(error = %e, "cannot notify the service manager");
    }

    serve_with_storage(
        listener,
        manager,
        auth,
        ServerOptions {
            max_message_bytes: config.max_message_bytes,
            tls,
            runner_id: config.runner_id.clone(),
            organization_id: config.organization_id.clone(),
            started,
            max_file_bytes: config.max_file_bytes,
            logs: Some(logs),
            secret_stores,
        },
        Some(storage),
        async {
            superseded_or_signal(membership.as_ref().map(|m| &m.ended)).await;
            let _ = notifier.notify("STOPPING=1");
        },
    )
    .await
    .map_err(|e| anyhow::anyhow!(sandpit_server::chain(&e)))?;
    let superseded = membership.as_ref().and_then(|m| m.ended.borrow().clone());
    if let Some(c) = console {
        c.shutdown().await;
    }
    // Pooled sandboxes have no record to be adopted by: they go.
    pools.drain_pool().await;
    if !pools.engine().settle(Duration::from_secs(30)).await {
        tracing::warn!("sandbox networks still being released; the next start sweeps them");
    }
    pools.engine().close_network().await;
    if let Some(why) = superseded {
        bail!("{why}");
    }
    tracing::info!("stopped; sandboxes keep running and are adopted at the next start");
    Ok(())
}

/// The gateway role: no engine, no data of its own (docs/scale-out.md).
async fn run_gateway(
    config: Config,
    cluster: sandpit_server::clusterconfig::ClusterSettings,
    notifier: sandpit_server::sd_notify::Notifier,
) -> Result<()> {
    // Keys: the configured ones and the store's principals (synced below).
    let auth = Auth::new(&config.api_keys);
    let tls = match &config.tls {
        Some(t) => Some((
            std::fs::read(&t.cert)
                .with_context(|| format!("read TLS certificate {}", t.cert.display()))?,
            std::fs::read(&t.key).with_context(|| format!("read TLS key {}", t.key.display()))?,
        )),
        None => None,
    };
    let store = sandpit_server::membership::connect(&cluster)
        .await
        .map_err(|e| anyhow::anyhow!(sandpit_server::chain(&e)))
        .context("connect to the cluster's PostgreSQL")?;
    let _principals = sandpit_server::principals::start(&store, &auth, cluster.lease).await;
    if config.api_keys.is_empty() && auth.shared_len() == 0 {
        tracing::warn!(
            "no API keys: none configured and no principal in the store; every call is \
             refused until one is added (sandpitd principal add NAME)"
        );
    }
    let _metrics = serve_metrics(&config, sandpit_server::metrics::http::RegistryOnly).await?;
    let ca = match &cluster.ca {
        Some((cert, key)) => Some(
            sandpit_server::direct::ClusterCa::load(cert, key)
                .map_err(|e| anyhow::anyhow!(sandpit_server::chain(&e)))
                .context("load the cluster CA (ca_cert_file, ca_key_file)")?,
        ),
        None => {
            tracing::info!("no cluster CA: ConnectSandbox answers UNIMPLEMENTED, data calls go through the gateway");
            None
        }
    };
    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("listen on {}", config.listen))?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, lease_s = cluster.lease.as_secs_f64(), "sandpitd gateway listening");
    // The same fixed line as a runner's: scripts wait for it.
    eprintln!("sandpitd listening on {addr}");
    if let Err(e) = notifier.notify("READY=1") {
        tracing::warn!(error = %e, "cannot notify the service manager");
    }
    sandpit_server::gateway::serve(
        listener,
        store,
        auth,
        sandpit_server::gateway::GatewayOptions {
            max_message_bytes: config.max_message_bytes,
            tls,
            default_resources: config.manager.default_resources,
            lease: cluster.lease,
            ca,
        },
        async {
            shutdown_signal().await;
            let _ = notifier.notify("STOPPING=1");
        },
    )
    .await
    .map_err(|e| anyhow::anyhow!(sandpit_server::chain(&e)))?;
    tracing::info!("gateway stopped");
    Ok(())
}

/// A runner's membership task and what ended it (`Some` once another
/// incarnation took over).
struct Running {
    _task: AbortOnDrop,
    ended: tokio::sync::watch::Receiver<Option<String>>,
}

impl AbortOnDrop {
    fn of(
        membership: impl std::future::Future<Output = sandpit_server::membership::MembershipError>
            + Send
            + 'static,
    ) -> Running {
        let (tx, rx) = tokio::sync::watch::channel(None);
        let task = tokio::spawn(async move {
            let why = membership.await;
            tracing::error!("{why}");
            tx.send_replace(Some(why.to_string()));
        });
        Running {
            _task: AbortOnDrop(task),
            ended: rx,
        }
    }
}

/// Resolves at SIGTERM or SIGINT, or once the membership ended.
async fn superseded_or_signal(ended: Option<&tokio::sync::watch::Receiver<Option<String>>>) {
    match ended {
        None => shutdown_signal().await,
        Some(rx) => {
            let mut rx = rx.clone();
            tokio::select! {
                _ = shutdown_signal() => {}
                _ = rx.wait_for(|v| v.is_some()) => {}
            }
        }
    }
}

/// The /metrics listener, when configured (see `metricsconfig.rs`: the
/// default address already taken only turns metrics off).
async fn serve_metrics<S: sandpit_server::metrics::http::Exposition>(
    config: &Config,
    source: S,
) -> Result<Option<AbortOnDrop>> {
    sandpit_server::metrics::init();
    let Some(addr) = config.metrics.listen else {
        tracing::info!("metrics off");
        return Ok(None);
    };
    let listener = match TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) if !config.metrics.explicit => {
            tracing::warn!(%addr, error = %e, "metrics off: the default address is not free");
            return Ok(None);
        }
        Err(e) => return Err(e).with_context(|| format!("metrics: listen on {addr}")),
    };
    let addr = listener.local_addr()?;
    tracing::info!(%addr, "serving metrics on /metrics");
    eprintln!("sandpitd metrics on http://{addr}/metrics");
    Ok(Some(AbortOnDrop(tokio::spawn(
        sandpit_server::metrics::http::serve(listener, source),
    ))))
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Resolves at the first SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot handle SIGTERM");
            return std::future::pending().await;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
    }
}

/// An exclusive lock on `<data-dir>/sandpitd.lock`.
fn lock_data_dir(dir: &Path) -> Result<nix::fcntl::Flock<std::fs::File>> {
    let path = dir.join("sandpitd.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("open {}", path.display()))?;
    match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Ok(lock),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
            bail!("another sandpitd is using {}", dir.display())
        }
        Err((_, e)) => Err(e).with_context(|| format!("lock {}", path.display())),
    }
}

/// The key in `path`, or a fresh one written there (0600).
fn load_or_generate_key(path: &Path) -> Result<String> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let key = text.trim().to_owned();
            if key.is_empty() {
                bail!(
                    "{} is empty; remove it to generate a new key",
                    path.display()
                );
            }
            let mode = std::fs::metadata(path)?.permissions().mode();
            if mode & 0o077 != 0 {
                tracing::warn!(path = %path.display(), mode = format!("{mode:o}"), "API key file is readable by others");
            }
            tracing::info!(path = %path.display(), "using the API key in");
            eprintln!("sandpitd: API key in {}", path.display());
            Ok(key)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = generate_key();
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .with_context(|| format!("create {}", path.display()))?;
            writeln!(f, "{key}")?;
            f.sync_all()?;
            tracing::info!(path = %path.display(), "generated an API key");
            eprintln!("sandpitd: generated an API key in {}", path.display());
            Ok(key)
        }
        Err(e) => Err(e).with_context(|| format!("read {}", path.display())),
    }
}

/// What the host admits: the config's figures, else the host's CPUs and
/// memory less a system share; the data dir's reserve.
fn allocatable(config: &Config) -> sandpit_server::manager::admission::Allocatable {
    let host = sandpit_server::local::host_capacity();
    let disk_total = nix::sys::statvfs::statvfs(&config.data_dir)
        .map(|st| st.blocks().saturating_mul(st.fragment_size()))
        .unwrap_or(0);
    let reserve = config
        .limits
        .data_dir_reserve
        .unwrap_or_else(|| sandpit_server::limitsconfig::auto_reserve(disk_total));
    let mut a = sandpit_server::manager::admission::Allocatable::of_host(
        host.cpu_millis,
        host.memory_total_bytes,
        reserve,
    );
    if let Some(cpu) = config.limits.allocatable_cpu {
        a.cpu_millis = cpu;
    }
    if let Some(memory) = config.limits.allocatable_memory {
        a.memory_bytes = memory;
    }
    a
}
