//! `cargo xtask dashboard`: the picture of the Grafana dashboard over real data, for the README
//! (docs/dashboard.png). The lab's demo cluster runs with traffic, Debian's Prometheus scrapes
//! its daemon, and Debian's headless Chromium draws deploy/grafana/preview (the dashboard's own
//! panels and queries, drawn with Chart.js: Grafana itself is packaged neither by Debian nor by
//! npm) from Prometheus' query API (`netpol-lab dashboard` does all that). This module also
//! installs Chart.js for `setup`.
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::{root, sh};

/// Debian packages of the picture (`setup --build-only` leaves them out).
pub const PACKAGES: &[&str] = &["prometheus", "chromium"];

/// Chart.js for the preview page, pinned by version and by the SHA-256 of the one file used.
const CHART_JS_NPM: &str = "chart.js@4.6.1";
const CHART_JS_FILE: &str = "package/dist/chart.umd.js";
const CHART_JS_SHA256: &str = "338399fb5bafe598d21cfc471b0590b61ceb321a985fade4f68499b151f67fbf";

/// Where `setup` puts Chart.js, and where the page is put together.
fn dir() -> PathBuf {
    root().join("target/dashboard")
}

fn chart_js() -> PathBuf {
    dir().join("chart.umd.js")
}

pub fn chart_js_ok() -> bool {
    crate::sha256(&chart_js()).as_deref() == Some(CHART_JS_SHA256)
}

/// Unpacks Chart.js's UMD build from its npm package into target/dashboard, checking it.
pub fn install_chart_js() -> Result<()> {
    let tmp = dir().join("npm");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    eprintln!("xtask setup: unpacking Chart.js from {CHART_JS_NPM} (npm)");
    sh(Command::new("npm").args(["pack", "--silent", CHART_JS_NPM, "--pack-destination"]).arg(&tmp))?;
    let tgz = std::fs::read_dir(&tmp)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "tgz"))
        .with_context(|| format!("npm pack {CHART_JS_NPM} left no .tgz in {}", tmp.display()))?;
    sh(Command::new("tar").arg("-xzf").arg(&tgz).arg("-C").arg(&tmp).arg(CHART_JS_FILE))?;
    let got = crate::sha256(&tmp.join(CHART_JS_FILE)).unwrap_or_default();
    if got != CHART_JS_SHA256 {
        bail!("{CHART_JS_NPM} {CHART_JS_FILE}: SHA-256 {got}, expected {CHART_JS_SHA256}");
    }
    std::fs::rename(tmp.join(CHART_JS_FILE), chart_js())?;
    std::fs::remove_dir_all(&tmp).ok();
    Ok(())
}

/// The preview page's files, fresh from the tree, with Chart.js: target/dashboard/page.
fn page() -> Result<PathBuf> {
    let page = dir().join("page");
    std::fs::create_dir_all(&page).with_context(|| format!("creating {}", page.display()))?;
    let preview = root().join("deploy/grafana/preview");
    for (from, name) in [
        (preview.join("index.html"), "index.html"),
        (preview.join("preview.mjs"), "preview.mjs"),
        (root().join("deploy/grafana/netpol-dashboard.json"), "netpol-dashboard.json"),
        (chart_js(), "chart.umd.js"),
    ] {
        std::fs::copy(&from, page.join(name)).with_context(|| format!("copying {}", from.display()))?;
    }
    Ok(page)
}

fn tool(name: &str) -> Result<PathBuf> {
    let p = Path::new("/usr/bin").join(name);
    if !p.exists() {
        bail!("{} missing: run `cargo xtask setup`", p.display());
    }
    Ok(p)
}

/// Runs the lab with `seconds` of traffic and writes docs/dashboard.png.
pub fn run(seconds: u64) -> Result<()> {
    if !crate::is_root() {
        bail!("the dashboard's picture comes from the netns lab (namespaces, BPF): run it as root");
    }
    crate::build()?;
    let out = root().join("docs/dashboard.png");
    std::fs::create_dir_all(out.parent().unwrap())?;
    sh(Command::new(root().join("target/debug/netpol-lab"))
        .arg("dashboard")
        .arg("--prometheus")
        .arg(tool("prometheus")?)
        .arg("--chromium")
        .arg(tool("chromium")?)
        .arg("--assets")
        .arg(page()?)
        .arg("--out")
        .arg(&out)
        .args(["--seconds", &seconds.to_string()]))
}
