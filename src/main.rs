//! The `pgvigil` command line: parses arguments, sets up logging, calls the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use pgvigil::collector::pack::Catalog;
use pgvigil::config::Config;

/// PostgreSQL observability exporter: YAML collector packs polled in the background,
/// served to Prometheus on /metrics.
#[derive(Parser, Debug)]
#[command(name = "pgvigil", version, about, long_about = None)]
struct Cli {
    /// Config file (YAML). Without one, a single target comes from DATA_SOURCE_NAME or the
    /// libpq PG* variables (PGHOST, PGPORT, PGUSER, PGPASSWORD, PGDATABASE).
    #[arg(long, short = 'c', global = true, env = "PGVIGIL_CONFIG")]
    config: Option<PathBuf>,
    /// Address to serve /metrics on (overrides `listen` in the config; default 127.0.0.1:9187).
    #[arg(long, global = true, env = "PGVIGIL_LISTEN")]
    listen: Option<std::net::SocketAddr>,
    /// HTTPS and basic auth for the listener: a web.yml in Prometheus exporter-toolkit's
    /// format (overrides `web_config_file` in the config).
    #[arg(
        long = "web.config.file",
        global = true,
        env = "PGVIGIL_WEB_CONFIG_FILE"
    )]
    web_config_file: Option<PathBuf>,
    /// Fleet mode: poll only the targets whose name hashes to shard I of N (`I/N`, e.g.
    /// 0/3), or `auto/N` to take I from the host name's trailing -<ordinal> (a StatefulSet
    /// pod). Overrides `shard` in the config.
    #[arg(long, global = true, env = "PGVIGIL_SHARD", value_parser = parse_shard)]
    shard: Option<pgvigil::config::Shard>,
    /// Log format.
    #[arg(long, global = true, default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Validate the config and all collector packs, and print the resolved plan
    /// (targets, collectors, intervals, the SQL variant per server version). Given a pack
    /// file instead of a config, validate that pack and describe its collectors.
    CheckConfig {
        /// Config or pack file to check (default: --config, or the environment-only setup).
        file: Option<PathBuf>,
        /// Also connect to every target and run every collector once: prints per target
        /// and collector ok / missing extension / missing privilege (with the grant that
        /// fixes it) / no variant for this version / error. Exit 0 when every target
        /// answered and nothing needs fixing (skips the packs declare are fine), 2 when a
        /// target is unreachable or a collector failed or lacks a privilege.
        #[arg(long)]
        connect: bool,
    },
    /// Poll every collector once and print the metrics text (for debugging a pack).
    Once,
    /// Start a throwaway local PostgreSQL and a standby with a workload that reproduces
    /// outages on a timeline (printed on stderr), and serve their metrics.
    Demo {
        /// Do not start and monitor a streaming standby.
        #[arg(long)]
        no_standby: bool,
        /// Print a Prometheus configuration that scrapes the demo (at --listen) and loads
        /// the alert rules (alerts/pgvigil.rules.yml), then exit.
        #[arg(long)]
        print_prometheus_config: bool,
        /// Multiply every time of the timeline by this (tests shrink it, e.g. 0.05).
        #[arg(long, hide = true, env = "PGVIGIL_DEMO_TIMELINE_SCALE", default_value = "1",
              value_parser = pgvigil::demo::parse_timeline_scale)]
        timeline_scale: f64,
    },
    /// Exit 0 if the pgvigil serving this config's listen address answers /healthz (for a
    /// container HEALTHCHECK: the image has no curl). Over HTTPS when web_config_file says so.
    Healthcheck,
}

fn main() -> ExitCode {
    limit_malloc_arenas();
    // Before any thread starts: it changes the process environment.
    pgvigil::trace::export::take_compression_env();
    let cli = Cli::parse();
    init_logging(&cli.log_format, self_spans_wanted(&cli));
    raise_open_file_limit();
    match real_main(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Error(e)) => {
            eprintln!("pgvigil: error: {e}");
            ExitCode::FAILURE
        }
        Err(Failure::Partial(n)) => {
            eprintln!("pgvigil: {n} problem(s) while polling; the metrics above are incomplete");
            ExitCode::from(2)
        }
        Err(Failure::Problems(n)) => {
            eprintln!("pgvigil: {n} problem(s) found on the targets (see above)");
            ExitCode::from(2)
        }
    }
}

/// How a command failed: exit 1 for an error that stopped it (config, start-up), exit 2
/// when `once` printed metrics but a target was unreachable or a collector failed.
enum Failure {
    Error(String),
    Partial(usize),
    /// `check-config --connect`: unreachable targets and collectors to fix (exit 2).
    Problems(usize),
}

impl From<String> for Failure {
    fn from(e: String) -> Failure {
        Failure::Error(e)
    }
}

/// glibc gives every thread that allocates its own arena, keeps freed memory in it, and
/// raises its mmap threshold as large blocks come and go. For a small exporter whose
/// polls allocate and free the same few hundred KB again and again, one arena and fixed
/// 64 KiB mmap/trim thresholds give the memory back: RSS median with 5,000 statements
/// measured 33 MB with glibc's defaults, 16.5 MB with these. `MALLOC_*` environment
/// variables, when set, still win.
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let tune = |var: &str, param: libc::c_int, value: libc::c_int| {
            if std::env::var_os(var).is_none() {
                // SAFETY: mallopt only changes allocator tuning; called before any
                // other thread exists.
                unsafe {
                    libc::mallopt(param, value);
                }
            }
        };
        tune("MALLOC_ARENA_MAX", libc::M_ARENA_MAX, 1);
        tune("MALLOC_MMAP_THRESHOLD_", libc::M_MMAP_THRESHOLD, 64 * 1024);
        tune("MALLOC_TRIM_THRESHOLD_", libc::M_TRIM_THRESHOLD, 64 * 1024);
    }
}

/// Raises the soft limit on open files to the hard limit. The soft default (often 1,024)
/// is what a burst of client connections exhausts first; the HTTP server caps its own
/// connections (512 by default), and sessions to PostgreSQL need descriptors too.
fn raise_open_file_limit() {
    #[cfg(unix)]
    {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit/setrlimit only read and write the struct passed in.
        if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
            tracing::debug!(
                "cannot read the open files limit: {}",
                std::io::Error::last_os_error()
            );
            return;
        }
        if lim.rlim_cur >= lim.rlim_max {
            tracing::debug!("open files limit: {}", lim.rlim_cur);
            return;
        }
        let before = lim.rlim_cur;
        // An unlimited hard limit cannot be the soft one (Linux caps it at fs.nr_open).
        lim.rlim_cur = if lim.rlim_max == libc::RLIM_INFINITY {
            1 << 20
        } else {
            lim.rlim_max
        };
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } == 0 {
            tracing::info!("open files limit raised from {before} to {}", lim.rlim_cur);
        } else {
            tracing::warn!(
                "cannot raise the open files limit from {before}: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

/// Logs to stderr, filtered by `PGVIGIL_LOG` (default `info`). With `self_spans`
/// (`tracing.self`), the layer that turns pgvigil's own poll and collector spans into
/// OpenTelemetry spans is installed beside it, with its own filter; without, it is not
/// installed at all.
fn init_logging(format: &str, self_spans: bool) {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    use tracing_subscriber::Layer as _;
    let filter = tracing_subscriber::EnvFilter::try_from_env("PGVIGIL_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let log = if format == "json" {
        fmt.json().with_filter(filter).boxed()
    } else {
        fmt.with_filter(filter).boxed()
    };
    let registry = tracing_subscriber::registry().with(log);
    if self_spans {
        registry.with(pgvigil::trace::selfspans::layer()).init();
    } else {
        registry.init();
    }
}

/// Whether the server about to run has `tracing.self: true`: its configuration read once
/// before logging exists, silently (the real read, with its warnings and errors, follows).
fn self_spans_wanted(cli: &Cli) -> bool {
    if cli.command.is_some() {
        return false;
    }
    tracing::subscriber::with_default(tracing::subscriber::NoSubscriber::default(), || {
        let over = Overrides {
            listen: cli.listen,
            web: None,
            shard: cli.shard,
        };
        load_config(cli.config.as_ref(), over).is_ok_and(|c| c.tracing.self_spans)
    })
}

/// `--shard I/N` or `auto/N` (see [`pgvigil::config::Shard::parse_arg`]).
fn parse_shard(s: &str) -> Result<pgvigil::config::Shard, String> {
    pgvigil::config::Shard::parse_arg(s, pgvigil::config::fleet::hostname)
}

/// Overrides from the command line (or their environment variables).
#[derive(Clone, Copy)]
struct Overrides<'a> {
    listen: Option<std::net::SocketAddr>,
    web: Option<&'a PathBuf>,
    shard: Option<pgvigil::config::Shard>,
}

fn load_config(path: Option<&PathBuf>, cli: Overrides<'_>) -> Result<Config, String> {
    let Overrides { listen, web, shard } = cli;
    let mut config = match path {
        Some(p) => Config::load(p).map_err(|e| e.to_string())?,
        None => Config::default(),
    };
    config
        .apply_env(&pgvigil::process_env)
        .map_err(|e| e.to_string())?;
    if let Some(l) = listen {
        config.listen = l;
    }
    if let Some(w) = web {
        config.web_config_file = Some(w.clone());
    }
    if shard.is_some() {
        config.shard = shard;
    }
    Ok(config)
}

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))
}

fn real_main(cli: Cli) -> Result<(), Failure> {
    let over = Overrides {
        listen: cli.listen,
        web: cli.web_config_file.as_ref(),
        shard: cli.shard,
    };
    match cli.command {
        None => {
            let config = load_config(cli.config.as_ref(), over)?;
            let (path, listen, web, shard) = (
                cli.config.clone(),
                cli.listen,
                cli.web_config_file.clone(),
                cli.shard,
            );
            let reload: pgvigil::Reload = Box::new(move || {
                let cli = Overrides {
                    listen,
                    web: web.as_ref(),
                    shard,
                };
                load_config(path.as_ref(), cli)
            });
            let rt = runtime()?;
            let result = rt
                .block_on(pgvigil::run(
                    config,
                    Some(reload),
                    shutdown_signal(),
                    |_| {},
                ))
                .map_err(|e| Failure::Error(e.to_string()));
            // Tasks still running (a span export stuck on a dead receiver) do not hold the
            // exit past the bound `pgvigil::SHUTDOWN_LIMIT` states.
            rt.shutdown_timeout(std::time::Duration::from_secs(1));
            result
        }
        Some(Command::CheckConfig { file, connect }) => {
            let file = file.as_ref().or(cli.config.as_ref());
            if let Some(path) = file {
                // A pack file on its own: validate it against the built-in packs.
                let text = std::fs::read_to_string(path)
                    .map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
                if pgvigil::collector::is_pack_text(&text) {
                    let plan =
                        pgvigil::collector::pack_plan_text(path).map_err(|e| e.to_string())?;
                    stdout(&format!("{plan}pack OK\n"));
                    return Ok(());
                }
            }
            let config = load_config(file, over)?;
            if let Some(web) = &config.web_config_file {
                pgvigil::web::Web::load(web).map_err(|e| e.to_string())?;
            }
            let catalog = Catalog::load(&config.collectors).map_err(|e| e.to_string())?;
            config
                .resolve_targets(&pgvigil::process_env)
                .map_err(|e| e.to_string())?;
            stdout(&format!(
                "{}config OK\n",
                pgvigil::collector::plan_text(&config, &catalog)
            ));
            if !connect {
                return Ok(());
            }
            let report = runtime()?
                .block_on(pgvigil::collector::check::run(&config, &catalog))
                .map_err(|e| e.to_string())?;
            stdout(&report.text());
            match report.problems() {
                0 => Ok(()),
                n => Err(Failure::Problems(n)),
            }
        }
        Some(Command::Once) => {
            let config = load_config(cli.config.as_ref(), Overrides { web: None, ..over })?;
            let report = runtime()?
                .block_on(pgvigil::once(&config))
                .map_err(|e| e.to_string())?;
            stdout(&report.text);
            if report.problems.is_empty() {
                Ok(())
            } else {
                for p in &report.problems {
                    eprintln!("pgvigil: {p}");
                }
                Err(Failure::Partial(report.problems.len()))
            }
        }
        Some(Command::Healthcheck) => {
            let config = load_config(cli.config.as_ref(), over)?;
            let tls = match &config.web_config_file {
                Some(web) => pgvigil::web::Web::load(web)
                    .map_err(|e| e.to_string())?
                    .tls(),
                None => false,
            };
            pgvigil::web::healthcheck(config.listen, tls, std::time::Duration::from_secs(3))
                .map_err(|e| Failure::Error(format!("unhealthy: {e}")))
        }
        Some(Command::Demo {
            print_prometheus_config: true,
            ..
        }) => {
            let listen = cli.listen.unwrap_or_else(|| Config::default().listen);
            print!("{}", pgvigil::demo::prometheus_config(listen, None));
            Ok(())
        }
        Some(Command::Demo {
            no_standby,
            timeline_scale,
            ..
        }) => {
            let opts = pgvigil::demo::DemoOptions {
                listen: cli.listen,
                standby: !no_standby,
                timeline_scale,
            };
            runtime()?
                .block_on(pgvigil::demo::run(opts, shutdown_signal()))
                .map_err(|e| Failure::Error(e.to_string()))
        }
    }
}

/// Writes `text` to stdout. A reader that went away (`pgvigil once | head`) is not an
/// error worth a panic: the rest is dropped, as `cat` does.
fn stdout(text: &str) {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            eprintln!("pgvigil: cannot write to stdout: {e}");
        }
    }
}

/// Resolves on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
