//! Where the default resources are: the model directory and the demo's examples,
//! found the way an installed command should find them (environment variable, working
//! directory, then beside the executable).

use anyhow::{Context, Result};
use std::path::{Path, PathBuf};

/// How many folders above the executable's own are searched for a default resource, so
/// that `target/release/mue` (or `target/release/deps/...`) in a clone finds the
/// repository's `models/default` and `examples`.
const EXE_ANCESTORS: usize = 4;

/// A default resource found by [`find_default`]: where it is and why that one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    pub path: PathBuf,
    /// `$VAR`, `working directory` or `beside the executable`.
    pub source: String,
}

/// Finds a default resource the way an installed command should: the environment
/// variable `var` when set (used as given, existing or not: the user asked for it), then
/// `rel` under the working directory, then `rel` beside the executable and in up to
/// [`EXE_ANCESTORS`] folders above it. A candidate counts when it holds `marker`. The
/// error lists every place tried.
pub fn find_default(var: &str, rel: &str, marker: &str) -> Result<Found> {
    if let Some(v) = std::env::var_os(var).filter(|v| !v.is_empty()) {
        return Ok(Found {
            path: PathBuf::from(v),
            source: format!("${var}"),
        });
    }
    let mut tried = vec![format!("${var} (not set)")];
    let cwd = PathBuf::from(rel);
    if cwd.join(marker).is_file() {
        return Ok(Found {
            path: cwd,
            source: "working directory".into(),
        });
    }
    tried.push(format!("./{rel}"));
    if let Some(exe_dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.canonicalize().ok())
        .and_then(|e| e.parent().map(Path::to_path_buf))
    {
        for dir in exe_dir.ancestors().take(EXE_ANCESTORS + 1) {
            let p = dir.join(rel);
            if p.join(marker).is_file() {
                return Ok(Found {
                    path: p,
                    source: "beside the executable".into(),
                });
            }
            tried.push(p.display().to_string());
        }
    }
    anyhow::bail!(
        "no {rel} found (a folder with {marker}); tried: {}",
        tried.join(", ")
    )
}

/// The model directory a command uses: `--model` when given, else the default model
/// (`$MUE_MODEL`, `./models/default`, then `models/default` beside the executable), and
/// says on stderr which default was used.
pub fn model_dir(explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = explicit {
        return Ok(p.to_path_buf());
    }
    let found = find_default("MUE_MODEL", "models/default", "config.json")
        .context("no --model given and no default model")?;
    eprintln!("mue: model {} ({})", found.path.display(), found.source);
    Ok(found.path)
}

/// The demo's examples folder (`$MUE_EXAMPLES`, `./examples`, then `examples` beside the
/// executable, see [`find_default`]); the error lists the places tried.
pub fn find_examples_dir() -> Result<Found> {
    find_default("MUE_EXAMPLES", "examples", "examples.json")
}

/// [`find_examples_dir`], or `examples` (relative) when none is found, so that the caller's
/// read of a file there fails naming it.
pub fn examples_dir() -> PathBuf {
    find_examples_dir()
        .map(|f| f.path)
        .unwrap_or_else(|_| PathBuf::from("examples"))
}
