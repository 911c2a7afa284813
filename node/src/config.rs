//! Settings from three places besides the command line, all with the same
//! names:
//! - environment variables: every long flag `--some-flag` of every command
//!   can be set as `FOGMESH_SOME_FLAG` (`--secret` as `FOGMESH_SECRET`, …);
//! - a TOML file (`--config FILE`, `$FOGMESH_CONFIG`, else
//!   `$FOGMESH_HOME/config.toml` when it exists): top-level keys apply to
//!   every command that has that flag, a `[node]`, `[run]`, … table to that
//!   command only; `some-flag` and `some_flag` are the same key; lists give
//!   a repeatable flag several times, `true` switches a flag on.
//!
//! The command line wins over the environment, which wins over the file,
//! which wins over the defaults. A key that is no flag of any command is an
//! error (a typo should not be silently ignored).

use std::ffi::OsString;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::parser::ValueSource;
use clap::{ArgMatches, Command};

/// The environment variable naming the config file.
pub const CONFIG_ENV: &str = "FOGMESH_CONFIG";

/// `FOGMESH_` + the flag in upper snake case.
pub fn env_name(long: &str) -> String {
    format!("FOGMESH_{}", long.replace('-', "_").to_uppercase())
}

/// Gives every long flag of every subcommand its `FOGMESH_*` variable
/// (where it has none already).
pub fn with_env(cmd: Command) -> Command {
    cmd.mut_subcommands(|sc| {
        sc.mut_args(|a| {
            let Some(long) = a.get_long() else { return a };
            if a.get_env().is_some() || matches!(long, "help" | "version") {
                return a;
            }
            let name: &'static str = Box::leak(env_name(long).into_boxed_str());
            a.env(name)
        })
    })
}

/// The config file to read: the one named on the command line or in the
/// environment (which must exist), else the default one if it exists.
fn config_path(matches: &ArgMatches) -> Result<Option<PathBuf>> {
    let named = matches.get_one::<PathBuf>("config").or_else(|| matches.subcommand().and_then(|(_, m)| m.get_one::<PathBuf>("config")));
    if let Some(p) = named {
        if !p.exists() {
            bail!("config file {} does not exist", p.display());
        }
        return Ok(Some(p.clone()));
    }
    let default = fogmesh_models::home_dir().join("config.toml");
    Ok(default.exists().then_some(default))
}

/// One TOML value as flag arguments.
fn values(key: &str, v: &toml::Value) -> Result<Vec<String>> {
    Ok(match v {
        toml::Value::String(s) => vec![s.clone()],
        toml::Value::Integer(i) => vec![i.to_string()],
        toml::Value::Float(f) => vec![f.to_string()],
        toml::Value::Boolean(b) => vec![b.to_string()],
        toml::Value::Array(a) => {
            let mut out = Vec::new();
            for x in a {
                if x.is_array() || x.is_table() {
                    bail!("config key {key}: lists hold plain values");
                }
                out.extend(values(key, x)?);
            }
            out
        }
        _ => bail!("config key {key}: expected a string, number, boolean or list"),
    })
}

/// The command line with the config file's settings added for the flags
/// that neither the command line nor the environment set.
pub fn apply(cmd: &Command, argv: Vec<OsString>) -> Result<Vec<OsString>> {
    let matches = match cmd.clone().try_get_matches_from(&argv) {
        Ok(m) => m,
        // Let the real parse report it (help, version and usage errors).
        Err(_) => return Ok(argv),
    };
    let Some(path) = config_path(&matches)? else { return Ok(argv) };
    let Some((name, sub_matches)) = matches.subcommand() else { return Ok(argv) };
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading config file {}", path.display()))?;
    let table: toml::Table = text.parse().with_context(|| format!("config file {} is not valid TOML", path.display()))?;
    let added = settings(cmd, name, sub_matches, &table).with_context(|| format!("in config file {}", path.display()))?;
    if added.is_empty() {
        return Ok(argv);
    }
    // The settings go right after the subcommand's name.
    let at = argv.iter().position(|a| a == name).map_or(argv.len(), |i| i + 1);
    let mut out = argv[..at].to_vec();
    out.extend(added.into_iter().map(OsString::from));
    out.extend_from_slice(&argv[at..]);
    Ok(out)
}

fn flag<'a>(cmd: &'a Command, key: &str) -> Option<&'a clap::Arg> {
    cmd.get_arguments().find(|a| a.get_long() == Some(key))
}

/// The arguments `table` adds to subcommand `name`.
fn settings(cmd: &Command, name: &str, sub_matches: &ArgMatches, table: &toml::Table) -> Result<Vec<String>> {
    let sub = cmd.find_subcommand(name).context("unknown subcommand")?;
    // The command's own table, then the top-level keys it does not set.
    let mut own: Vec<(&clap::Arg, &toml::Value)> = Vec::new();
    let mut top: Vec<(&clap::Arg, &toml::Value)> = Vec::new();
    for (k, v) in table {
        let key = k.replace('_', "-");
        if let Some(t) = v.as_table() {
            let Some(table_cmd) = cmd.find_subcommand(&key) else { bail!("[{k}] is not a fogmesh command") };
            for (k2, v2) in t {
                let key2 = k2.replace('_', "-");
                let Some(arg) = flag(table_cmd, &key2) else { bail!("[{k}] {k2}: `fogmesh {key}` has no flag --{key2}") };
                if key == name {
                    own.push((arg, v2));
                }
            }
        } else if let Some(arg) = flag(sub, &key) {
            top.push((arg, v));
        } else if !cmd.get_subcommands().any(|s| flag(s, &key).is_some()) {
            bail!("{k} is not a flag of any fogmesh command");
        }
    }
    top.retain(|(a, _)| !own.iter().any(|(o, _)| o.get_id() == a.get_id()));
    let mut out = Vec::new();
    for (arg, v) in own.into_iter().chain(top) {
        let key = arg.get_long().unwrap_or_default();
        if matches!(sub_matches.value_source(arg.get_id().as_str()), Some(ValueSource::CommandLine | ValueSource::EnvVariable)) {
            continue;
        }
        let takes_value = arg.get_action().takes_values();
        for val in values(key, v)? {
            if takes_value {
                out.push(format!("--{key}={val}"));
            } else {
                match val.as_str() {
                    "true" => out.push(format!("--{key}")),
                    "false" => {}
                    _ => bail!("{key} is a switch: set it to true or false"),
                }
            }
        }
    }
    Ok(out)
}
