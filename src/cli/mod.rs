//! Command line: `serve | demo | validate | keys ...`, parsed with clap derive.

pub(crate) mod demo;
pub(crate) mod exit;
pub(crate) mod keys;
pub mod serve;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

use exit::{EXIT_FAILURE, EXIT_INVALID};

/// keygate: an API gateway that lets through only requests with a valid, scoped API key.
#[derive(Debug, Parser)]
#[command(name = "keygate", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Top-level commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway.
    Serve {
        /// Config file.
        #[arg(long, env = "KEYGATE_CONFIG", default_value = "config/keygate.yaml")]
        config: PathBuf,
    },
    /// Zero-setup first run: an echo upstream, a fresh demo key, ready-to-paste curl commands.
    Demo {
        /// Address to serve on.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: std::net::SocketAddr,
    },
    /// An echo upstream for trying keygate out: answers every request with it as JSON.
    Echo {
        /// Address to serve on (the shipped example's upstream).
        #[arg(long, default_value = "127.0.0.1:9001")]
        listen: std::net::SocketAddr,
    },
    /// Check the config and its key file; lists every problem as file:line:column: message.
    Validate {
        /// Config file.
        #[arg(long, env = "KEYGATE_CONFIG", default_value = "config/keygate.yaml")]
        config: PathBuf,
    },
    /// Manage API keys.
    Keys(Box<keys::KeysArgs>),
}

/// Set when diagnostics are JSON lines, so errors printed on the way out are JSON too.
pub static JSON_DIAGNOSTICS: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// True when `serve` should write its diagnostics as JSON: `log_format: json`, the default,
/// also when the config cannot be read (its problems are then JSON lines too).
pub fn json_diagnostics(cli: &Cli) -> bool {
    match &cli.command {
        Command::Serve { config } => std::fs::read_to_string(config)
            .ok()
            .and_then(|text| crate::config::Config::parse(config, &text).ok())
            .is_none_or(|c| c.log_format == crate::config::LogFormat::Json),
        _ => false,
    }
}

/// Prints a fatal diagnostic: a JSON object when diagnostics are JSON, else plain text.
fn fatal(message: &str) {
    if JSON_DIAGNOSTICS.load(std::sync::atomic::Ordering::Relaxed) {
        for line in message.lines() {
            tracing::error!("{line}");
        }
    } else {
        eprintln!("{message}");
    }
}

/// Runs a parsed command line and returns the process exit code.
pub fn run(cli: Cli) -> ExitCode {
    let result = match cli.command {
        Command::Serve { config } => serve(&config),
        Command::Demo { listen } => {
            runtime().and_then(|rt| rt.block_on(crate::cli::demo::run(listen)))
        }
        Command::Echo { listen } => {
            runtime().and_then(|rt| rt.block_on(crate::cli::demo::run_echo(listen)))
        }
        Command::Validate { config } => return validate(&config),
        Command::Keys(args) => return keys::run(*args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if let Some(crate::cli::serve::ServeError::Invalid(problems)) =
                e.downcast_ref::<crate::cli::serve::ServeError>()
            {
                fatal(&problems.to_string());
                return ExitCode::from(EXIT_INVALID);
            }
            fatal(&format!("keygate: {e:#}"));
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

fn serve(config_path: &Path) -> anyhow::Result<()> {
    // Fail fast on a bad config before binding anything.
    let config =
        crate::config::Config::load(config_path).map_err(crate::cli::serve::ServeError::from)?;
    let rt = runtime()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("cannot listen on {}", config.listen))?;
        crate::cli::serve::serve(config_path, listener, crate::cli::serve::shutdown_signal())
            .await?;
        Ok(())
    })
}

fn validate(config_path: &Path) -> ExitCode {
    let problems = match crate::config::Config::load(config_path) {
        Err(p) => p.0,
        Ok(config) => {
            // Warnings do not fail the check; they print first, in the problems' format.
            for w in &config.warnings {
                println!("{}", crate::config::Warning(w));
            }
            match crate::keys::load_key_file(&config.keys_file) {
                Err(p) => config.locate_key_file_problems(p).0,
                Ok(_) => Vec::new(),
            }
        }
    };
    if problems.is_empty() {
        println!("{}: ok", config_path.display());
        ExitCode::SUCCESS
    } else {
        for p in &problems {
            println!("{p}");
        }
        eprintln!("{} problem(s) found", problems.len());
        ExitCode::from(EXIT_INVALID)
    }
}
