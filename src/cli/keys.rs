//! `keygate keys ...`: create, list, revoke, rotate, hash and import keys in the key file;
//! every change is recorded in the audit log when one is kept (`audit`).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand, ValueEnum};
use serde::Serialize;
use time::OffsetDateTime;

use crate::cli::exit::{EXIT_FAILURE, EXIT_INVALID};
use crate::config::Config;
use crate::keys::audit::{Action, AuditLog, Entry};
use crate::keys::check_scope;
use crate::keys::file::{self as keyfile, KeyFileError};
use crate::keys::last_used as state;
use crate::keys::limit::Limits;
use crate::keys::{self, KeyRecord};

mod audit;
mod import;
mod limits;
mod list;
mod revoke;
mod rotate;
mod secret;

pub use limits::LimitArgs;

use list::{list_json, list_text};
pub use rotate::RotateArgs;

/// Output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// For people.
    Text,
    /// For scripts.
    Json,
    /// `create` and `rotate`: a Kubernetes Secret holding the updated key file, for
    /// `kubectl apply -f -` (the new key goes to stderr, never into the manifest).
    K8sSecret,
}

/// Options shared by every `keys` command.
#[derive(Debug, Args)]
pub struct KeysArgs {
    /// Config file whose `keys_file` to manage.
    #[arg(
        long,
        global = true,
        env = "KEYGATE_CONFIG",
        default_value = "config/keygate.yaml"
    )]
    pub config: PathBuf,
    /// Key file to manage directly (instead of the config's).
    #[arg(long, global = true)]
    pub keys_file: Option<PathBuf>,
    /// Output format.
    #[arg(long, global = true, value_enum, default_value_t = Output::Text)]
    pub output: Output,
    /// Who is making the change, for the audit log (default: $USER).
    #[arg(long, global = true)]
    pub actor: Option<String>,
    /// Audit log to append to (instead of the config's `audit_log`); with `--keys-file`,
    /// the only way to have the change audited.
    #[arg(long, global = true)]
    pub audit_log: Option<PathBuf>,
    /// The command.
    #[command(subcommand)]
    pub command: KeysCommand,
}

/// `keys` subcommands.
#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Generate a key, store its hash, print the secret once.
    Create {
        /// Service account the key acts as.
        #[arg(long)]
        service_account: String,
        /// A scope to grant (repeat for more).
        #[arg(long = "scope", required = true)]
        scopes: Vec<String>,
        /// Lifetime, e.g. 90d, 12h.
        #[arg(long, conflicts_with = "expires_at")]
        expires_in: Option<String>,
        /// Expiry as RFC 3339.
        #[arg(long)]
        expires_at: Option<String>,
        /// Free text.
        #[arg(long)]
        description: Option<String>,
        /// With `--output k8s-secret`: the Secret's name.
        #[arg(long)]
        secret_name: Option<String>,
        /// Rate limit, quota and client networks.
        #[command(flatten)]
        limits: LimitArgs,
    },
    /// List keys (never hashes or secrets).
    List,
    /// Revoke a key by id.
    Revoke {
        /// Key id.
        id: String,
    },
    /// Reissue a key; the old one expires after the grace period (or is revoked now).
    Rotate(RotateArgs),
    /// Read one key from stdin and print its sha256: hash line.
    Hash,
    /// Print the audit log, or the lines about one key.
    Audit {
        /// Only lines about this key id (as the key, or as the key a rotation replaced).
        id: Option<String>,
    },
    /// Add an entry for a key issued elsewhere, by hash.
    Import {
        /// sha256:<64 hex>.
        #[arg(long)]
        hash: String,
        /// Service account the key acts as.
        #[arg(long)]
        service_account: String,
        /// A scope to grant (repeat for more).
        #[arg(long = "scope", required = true)]
        scopes: Vec<String>,
        /// Id to use (default: generated).
        #[arg(long)]
        id: Option<String>,
        /// Lifetime, e.g. 90d.
        #[arg(long, conflicts_with = "expires_at")]
        expires_in: Option<String>,
        /// Expiry as RFC 3339.
        #[arg(long)]
        expires_at: Option<String>,
        /// Free text.
        #[arg(long)]
        description: Option<String>,
        /// Rate limit, quota and client networks.
        #[command(flatten)]
        limits: LimitArgs,
    },
}

/// A failure with its exit code; printed as one line.
struct Failure {
    code: u8,
    message: String,
}

fn usage(message: impl Into<String>) -> Failure {
    Failure {
        code: EXIT_INVALID,
        message: message.into(),
    }
}

fn failure(message: impl Into<String>) -> Failure {
    Failure {
        code: EXIT_FAILURE,
        message: message.into(),
    }
}

impl From<KeyFileError> for Failure {
    fn from(e: KeyFileError) -> Self {
        match e {
            KeyFileError::Invalid(p) => Failure {
                code: EXIT_INVALID,
                message: p.to_string().replace('\n', "; "),
            },
            e @ (KeyFileError::Io { .. } | KeyFileError::Audit { .. }) => failure(e.to_string()),
        }
    }
}

/// Runs a `keys` command and returns the exit code.
pub fn run(args: KeysArgs) -> ExitCode {
    match execute(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("keygate: error: {}", f.message);
            ExitCode::from(f.code)
        }
    }
}

/// Where the key file, state file, known scopes and audit log come from.
struct Target {
    keys_file: PathBuf,
    state_file: PathBuf,
    known_scopes: Option<Vec<String>>,
    /// Where key changes are recorded; `None` with `--keys-file` and no `--audit-log`.
    audit: Option<AuditLog>,
}

fn target(args: &KeysArgs) -> Result<Target, Failure> {
    let actor = audit::actor(args.actor.as_deref())?;
    let audit_at = |config_path: Option<PathBuf>| {
        args.audit_log.clone().or(config_path).map(|path| AuditLog {
            path,
            actor: actor.clone(),
        })
    };
    if let Some(path) = &args.keys_file {
        // No config is read: only `--audit-log` can name an audit log here.
        let state_file = crate::config::default_state_file(path);
        return Ok(Target {
            keys_file: path.clone(),
            state_file,
            known_scopes: None,
            audit: audit_at(None),
        });
    }
    let config = Config::load(&args.config).map_err(|p| Failure {
        code: EXIT_INVALID,
        message: p.to_string().replace('\n', "; "),
    })?;
    Ok(Target {
        keys_file: config.keys_file.clone(),
        state_file: config.state_file.clone(),
        known_scopes: config.known_scopes.clone(),
        audit: audit_at(config.audit_log.clone()),
    })
}

fn check_scopes(scopes: &[String], known: Option<&[String]>) -> Result<(), Failure> {
    for s in scopes {
        check_scope(s).map_err(usage)?;
        if let Some(known) = known {
            let covered = known
                .iter()
                .any(|k| keys::Grant::parse(s).covers(k) || k == s);
            if !covered {
                let closest = known
                    .iter()
                    .min_by_key(|k| strsim::levenshtein(k, s))
                    .map(|k| format!("; did you mean {k:?}?"))
                    .unwrap_or_default();
                return Err(usage(format!("unknown scope {s:?}{closest}")));
            }
        }
    }
    Ok(())
}

/// The checks `create` and `import` share: account, scopes, expiry.
fn new_key_terms(
    target: &Target,
    service_account: &str,
    scopes: &[String],
    now: OffsetDateTime,
    expires_in: Option<&str>,
    expires_at: Option<&str>,
) -> Result<Option<OffsetDateTime>, Failure> {
    if !keys::valid_service_account(service_account) {
        return Err(usage(
            "--service-account: expected visible ASCII without spaces",
        ));
    }
    check_scopes(scopes, target.known_scopes.as_deref())?;
    expiry(now, expires_in, expires_at)
}

fn expiry(
    now: OffsetDateTime,
    expires_in: Option<&str>,
    expires_at: Option<&str>,
) -> Result<Option<OffsetDateTime>, Failure> {
    if let Some(d) = expires_in {
        let d =
            crate::config::parse_duration(d).map_err(|e| usage(format!("--expires-in: {e}")))?;
        let d = time::Duration::try_from(d).map_err(|_| usage("--expires-in: too long"))?;
        return now
            .checked_add(d)
            .map(Some)
            .ok_or_else(|| usage("--expires-in: too long"));
    }
    if let Some(t) = expires_at {
        let t = keys::parse_time(t).map_err(|e| usage(format!("--expires-at: {e}")))?;
        if t <= now {
            return Err(usage("--expires-at: that time is in the past"));
        }
        return Ok(Some(t));
    }
    Ok(None)
}

/// A fresh key id: 12 base62 characters, starting with a letter.
fn new_id(existing: &[KeyRecord]) -> Result<String, Failure> {
    loop {
        let key = keys::generate().map_err(|e| failure(format!("OS random source failed: {e}")))?;
        // The body of a fresh key is uniform base62; its middle makes a good id.
        let id: String = key[3..]
            .chars()
            .skip_while(|c| !c.is_ascii_alphabetic())
            .take(12)
            .collect();
        if id.len() == 12 && !existing.iter().any(|r| r.id == id) {
            return Ok(id);
        }
    }
}

#[derive(Serialize)]
struct Issued<'a> {
    id: &'a str,
    key: &'a str,
    service_account: &'a str,
    scopes: &'a [String],
    created_at: String,
    expires_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    replaces: Option<&'a str>,
}

/// Prints a new key once; `secret` is the Secret name and key file text for k8s-secret.
fn print_issued(
    out: Output,
    rec: &KeyRecord,
    key: &str,
    replaces: Option<&str>,
    secret: Option<(&str, &str)>,
) {
    match (out, secret) {
        (Output::K8sSecret, Some((name, key_file))) => {
            print!("{}", secret::manifest(name, key_file));
            // The secret is for the operator, never for the cluster: stderr, not the manifest.
            eprintln!("{key}");
            eprintln!(
                "Created key {} for {}. Store the secret now: it cannot be shown again, and it \
                 is not in the manifest.",
                rec.id, rec.service_account
            );
        }
        (Output::Text | Output::K8sSecret, _) => {
            println!("{key}");
            eprintln!(
                "Created key {} for {}. Store the secret now: it cannot be shown again.",
                rec.id, rec.service_account
            );
        }
        (Output::Json, _) => {
            let doc = Issued {
                id: &rec.id,
                key,
                service_account: &rec.service_account,
                scopes: &rec.scopes,
                created_at: rec.created_at.map(keys::format_time).unwrap_or_default(),
                expires_at: rec.expires_at.map(keys::format_time),
                replaces,
            };
            println!("{}", serde_json::to_string(&doc).unwrap_or_default());
        }
    }
}

/// A newly issued (or imported) key's record; the id is filled in under the file lock.
pub(crate) struct Terms<'a> {
    pub(crate) service_account: &'a str,
    pub(crate) scopes: &'a [String],
    pub(crate) description: Option<&'a str>,
    pub(crate) expires_at: Option<OffsetDateTime>,
    pub(crate) limits: Limits,
}

impl Terms<'_> {
    /// The record for a key with `hash`, created `now`.
    pub(crate) fn record(
        &self,
        id: String,
        hash: keys::Digest32,
        now: OffsetDateTime,
    ) -> KeyRecord {
        KeyRecord {
            id,
            hash,
            service_account: self.service_account.to_string(),
            scopes: self.scopes.to_vec(),
            description: self.description.map(str::to_string),
            created_at: Some(now),
            expires_at: self.expires_at,
            revoked_at: None,
            limits: self.limits.clone(),
        }
    }
}

fn execute(args: &KeysArgs) -> Result<(), Failure> {
    let now = OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .unwrap_or(OffsetDateTime::now_utc());
    if let KeysCommand::Hash = args.command {
        return import::hash();
    }
    let t = target(args)?;
    let secret_name = secret::name_for(args)?;
    match &args.command {
        KeysCommand::Hash => Ok(()),
        KeysCommand::Audit { id } => audit::show(args.output, &t, id.as_deref()),
        KeysCommand::Create {
            service_account,
            scopes,
            expires_in,
            expires_at,
            description,
            secret_name: _,
            limits,
        } => {
            let expires_at = new_key_terms(
                &t,
                service_account,
                scopes,
                now,
                expires_in.as_deref(),
                expires_at.as_deref(),
            )?;
            let terms = Terms {
                service_account,
                scopes,
                description: description.as_deref(),
                expires_at,
                limits: limits.apply(&Limits::default())?,
            };
            create(args.output, &t, &terms, now, secret_name)
        }
        KeysCommand::Import {
            hash,
            service_account,
            scopes,
            id,
            expires_in,
            expires_at,
            description,
            limits,
        } => {
            let expires_at = new_key_terms(
                &t,
                service_account,
                scopes,
                now,
                expires_in.as_deref(),
                expires_at.as_deref(),
            )?;
            let terms = Terms {
                service_account,
                scopes,
                description: description.as_deref(),
                expires_at,
                limits: limits.apply(&Limits::default())?,
            };
            import::import(args.output, &t, hash, id.as_deref(), &terms, now)
        }
        KeysCommand::List => list(args.output, &t, now),
        KeysCommand::Revoke { id } => revoke::revoke(args.output, &t, id, now),
        KeysCommand::Rotate(r) => rotate::run(args.output, &t, now, r, secret_name),
    }
}

/// `keys create`: a fresh key, its secret printed once.
fn create(
    out: Output,
    t: &Target,
    terms: &Terms<'_>,
    now: OffsetDateTime,
    secret_name: Option<&str>,
) -> Result<(), Failure> {
    let key = keys::generate().map_err(|e| failure(format!("OS random source failed: {e}")))?;
    let (rec, text) = keyfile::update_audited(&t.keys_file, t.audit.as_ref(), |records| {
        let id = new_id(records).map_err(|f| f.message)?;
        let rec = terms.record(id, keys::digest(key.as_bytes()), now);
        records.push(rec.clone());
        let entry = t.entry(Action::Create, &rec, now);
        Ok(((rec, keyfile::render(records)), entry))
    })?
    .map_err(failure)?;
    print_issued(
        out,
        &rec,
        &key,
        None,
        secret_name.map(|n| (n, text.as_str())),
    );
    Ok(())
}

impl Target {
    /// The audit line for `action` on `rec` (built whether or not a log is kept).
    fn entry(&self, action: Action, rec: &KeyRecord, now: OffsetDateTime) -> Entry {
        let actor = self.audit.as_ref().map_or("", |a| a.actor.as_str());
        Entry::of(action, rec, actor, now)
    }
}

/// `keys list`.
fn list(out: Output, t: &Target, now: OffsetDateTime) -> Result<(), Failure> {
    let records = keyfile::read(&t.keys_file)?;
    let st = state::load(&t.state_file);
    match out {
        Output::Json => println!("{}", list_json(&records, &st, now)),
        Output::Text | Output::K8sSecret => print!("{}", list_text(&records, &st, now)),
    }
    Ok(())
}
