//! A small, reproducible OCI image builder: one uncompressed layer made from
//! files given in memory, an image config, a manifest, and an OCI image
//! layout written as one tar archive (what `ctr images import` reads).
//!
//! Reproducible: entries are sorted, every timestamp is 0, owners are root,
//! and the JSON documents are serialized with sorted keys, so the same
//! inputs give the same manifest digest.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use anyhow::{Context as _, Result, bail};
use serde_json::json;
use sha2::{Digest as _, Sha256};

/// One entry of the image's filesystem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    /// A directory with this mode.
    Dir(u32),
    /// A regular file: mode and contents.
    File(u32, Vec<u8>),
    /// A symbolic link to this target.
    Symlink(String),
}

/// What an image holds and how it starts.
#[derive(Debug, Clone, Default)]
pub struct ImageSpec {
    /// The full reference it is imported under, e.g. `docker.io/vfplane/vfplane:dev`.
    pub reference: String,
    /// Path (relative, no leading `/`) to entry. Parent directories are added.
    pub entries: BTreeMap<String, Entry>,
    /// `config.Entrypoint`.
    pub entrypoint: Vec<String>,
    /// `config.Cmd`.
    pub cmd: Vec<String>,
    /// `config.Env`, `NAME=value`.
    pub env: Vec<String>,
}

/// What [`write_archive`] made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuiltImage {
    /// The reference it carries.
    pub reference: String,
    /// `sha256:<hex>` of the manifest: the image's digest.
    pub manifest_digest: String,
    /// Size of the archive in bytes.
    pub archive_bytes: u64,
}

impl ImageSpec {
    /// Adds a file at `path` (relative) with `mode`.
    pub fn file(&mut self, path: &str, mode: u32, contents: Vec<u8>) -> &mut Self {
        self.entries.insert(
            path.trim_start_matches('/').to_owned(),
            Entry::File(mode, contents),
        );
        self
    }

    /// Adds a symlink at `path` pointing to `target`.
    pub fn symlink(&mut self, path: &str, target: &str) -> &mut Self {
        self.entries.insert(
            path.trim_start_matches('/').to_owned(),
            Entry::Symlink(target.to_owned()),
        );
        self
    }

    /// Adds a directory at `path`.
    pub fn dir(&mut self, path: &str, mode: u32) -> &mut Self {
        self.entries.insert(
            path.trim_start_matches('/').trim_end_matches('/').to_owned(),
            Entry::Dir(mode),
        );
        self
    }

    /// The tag part of the reference (after the last `:` of the last path element).
    fn tag(&self) -> &str {
        let last = self.reference.rsplit('/').next().unwrap_or(&self.reference);
        last.rsplit_once(':').map_or("latest", |(_, tag)| tag)
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// The layer tar: every entry and its parent directories, sorted by path.
fn layer_tar(spec: &ImageSpec) -> Result<Vec<u8>> {
    for path in spec.entries.keys() {
        if path.is_empty()
            || path
                .split('/')
                .any(|part| part == ".." || part == "." || part.is_empty())
        {
            bail!("image path {path:?} is not a plain relative path");
        }
    }
    let mut entries = spec.entries.clone();
    for path in spec.entries.keys() {
        let mut parent = Path::new(path).parent();
        while let Some(dir) = parent.filter(|p| !p.as_os_str().is_empty()) {
            entries
                .entry(dir.to_string_lossy().into_owned())
                .or_insert(Entry::Dir(0o755));
            parent = dir.parent();
        }
    }
    let mut builder = tar::Builder::new(Vec::new());
    builder.mode(tar::HeaderMode::Deterministic);
    for (path, entry) in &entries {
        let mut header = tar::Header::new_ustar();
        header.set_mtime(0);
        header.set_uid(0);
        header.set_gid(0);
        match entry {
            Entry::Dir(mode) => {
                header.set_entry_type(tar::EntryType::Directory);
                header.set_mode(*mode);
                header.set_size(0);
                builder.append_data(&mut header, format!("{path}/"), std::io::empty())?;
            }
            Entry::File(mode, contents) => {
                header.set_entry_type(tar::EntryType::Regular);
                header.set_mode(*mode);
                header.set_size(contents.len() as u64);
                builder.append_data(&mut header, path, contents.as_slice())?;
            }
            Entry::Symlink(target) => {
                header.set_entry_type(tar::EntryType::Symlink);
                header.set_mode(0o777);
                header.set_size(0);
                builder.append_link(&mut header, path, target)?;
            }
        }
    }
    Ok(builder.into_inner()?)
}

/// Writes `spec` as an OCI image layout in one tar archive at `out`.
///
/// # Errors
/// A path that is not relative, or a write that fails.
pub fn write_archive(spec: &ImageSpec, out: &Path) -> Result<BuiltImage> {
    let layer = layer_tar(spec)?;
    let layer_digest = format!("sha256:{}", sha256_hex(&layer));
    let mut config = json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": spec.env},
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
    });
    if !spec.entrypoint.is_empty() {
        config["config"]["Entrypoint"] = json!(spec.entrypoint);
    }
    if !spec.cmd.is_empty() {
        config["config"]["Cmd"] = json!(spec.cmd);
    }
    let config = serde_json::to_vec(&config)?;
    let config_digest = format!("sha256:{}", sha256_hex(&config));
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest,
            "size": config.len(),
        },
        "layers": [{
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": layer_digest,
            "size": layer.len(),
        }],
    }))?;
    let manifest_digest = format!("sha256:{}", sha256_hex(&manifest));
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest,
            "size": manifest.len(),
            "platform": {"architecture": "amd64", "os": "linux"},
            "annotations": {
                "io.containerd.image.name": spec.reference,
                "org.opencontainers.image.ref.name": spec.tag(),
            },
        }],
    }))?;

    let mut archive = tar::Builder::new(Vec::new());
    archive.mode(tar::HeaderMode::Deterministic);
    let mut add = |path: &str, bytes: &[u8]| -> Result<()> {
        let mut header = tar::Header::new_ustar();
        header.set_mtime(0);
        header.set_mode(0o644);
        header.set_size(bytes.len() as u64);
        header.set_entry_type(tar::EntryType::Regular);
        archive.append_data(&mut header, path, bytes)?;
        Ok(())
    };
    add("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    add("index.json", &index)?;
    for (digest, bytes) in [
        (&layer_digest, &layer),
        (&config_digest, &config),
        (&manifest_digest, &manifest),
    ] {
        let hex = digest.trim_start_matches("sha256:");
        add(&format!("blobs/sha256/{hex}"), bytes)?;
    }
    let bytes = archive.into_inner()?;
    if let Some(parent) = out.parent() {
        fs::create_dir_all(parent)?;
    }
    fs::write(out, &bytes).with_context(|| format!("writing {}", out.display()))?;
    Ok(BuiltImage {
        reference: spec.reference.clone(),
        manifest_digest,
        archive_bytes: bytes.len() as u64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> ImageSpec {
        let mut spec = ImageSpec {
            reference: "docker.io/vfplane/test:dev".to_owned(),
            entrypoint: vec!["/bin/sh".to_owned()],
            ..ImageSpec::default()
        };
        spec.file("bin/busybox", 0o755, b"not really busybox".to_vec())
            .symlink("bin/sh", "busybox")
            .dir("tmp", 0o1777);
        spec
    }

    #[test]
    fn same_inputs_give_the_same_digest_and_bytes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = write_archive(&sample(), &dir.path().join("a.tar")).expect("a");
        let b = write_archive(&sample(), &dir.path().join("b.tar")).expect("b");
        assert_eq!(a.manifest_digest, b.manifest_digest);
        assert_eq!(
            fs::read(dir.path().join("a.tar")).expect("read a"),
            fs::read(dir.path().join("b.tar")).expect("read b")
        );
        let mut other = sample();
        other.file("bin/busybox", 0o755, b"changed".to_vec());
        let c = write_archive(&other, &dir.path().join("c.tar")).expect("c");
        assert_ne!(a.manifest_digest, c.manifest_digest);
    }

    #[test]
    fn layout_blobs_match_their_digests_and_the_index_names_the_image() {
        let dir = tempfile::tempdir().expect("tempdir");
        let built = write_archive(&sample(), &dir.path().join("i.tar")).expect("write");
        let mut archive = tar::Archive::new(fs::File::open(dir.path().join("i.tar")).expect("open"));
        let mut files = BTreeMap::new();
        for entry in archive.entries().expect("entries") {
            let mut entry = entry.expect("entry");
            let path = entry.path().expect("path").to_string_lossy().into_owned();
            let mut bytes = Vec::new();
            std::io::Read::read_to_end(&mut entry, &mut bytes).expect("read");
            files.insert(path, bytes);
        }
        for (path, bytes) in &files {
            if let Some(hex) = path.strip_prefix("blobs/sha256/") {
                assert_eq!(sha256_hex(bytes), hex, "{path}");
            }
        }
        let index: serde_json::Value = serde_json::from_slice(&files["index.json"]).expect("index");
        let manifest = &index["manifests"][0];
        assert_eq!(manifest["digest"], built.manifest_digest.as_str());
        assert_eq!(
            manifest["annotations"]["io.containerd.image.name"],
            "docker.io/vfplane/test:dev"
        );
        assert_eq!(
            manifest["annotations"]["org.opencontainers.image.ref.name"],
            "dev"
        );
        // The layer holds the parent directory and the entries, root-owned, at time 0.
        let manifest_hex = built.manifest_digest.trim_start_matches("sha256:");
        let manifest: serde_json::Value =
            serde_json::from_slice(&files[&format!("blobs/sha256/{manifest_hex}")]).expect("manifest");
        let layer_hex = manifest["layers"][0]["digest"]
            .as_str()
            .expect("layer digest")
            .trim_start_matches("sha256:");
        let layer = &files[&format!("blobs/sha256/{layer_hex}")];
        let mut layer = tar::Archive::new(layer.as_slice());
        let names: Vec<(String, u64, u64)> = layer
            .entries()
            .expect("layer entries")
            .map(|e| {
                let e = e.expect("layer entry");
                let header = e.header();
                (
                    e.path().expect("path").to_string_lossy().into_owned(),
                    header.mtime().expect("mtime"),
                    header.uid().expect("uid"),
                )
            })
            .collect();
        assert_eq!(
            names,
            [
                ("bin/".to_owned(), 0, 0),
                ("bin/busybox".to_owned(), 0, 0),
                ("bin/sh".to_owned(), 0, 0),
                ("tmp/".to_owned(), 0, 0),
            ]
        );
    }

    #[test]
    fn a_path_that_climbs_out_is_refused() {
        let mut spec = sample();
        spec.file("../etc/passwd", 0o644, Vec::new());
        let dir = tempfile::tempdir().expect("tempdir");
        let err = write_archive(&spec, &dir.path().join("x.tar")).expect_err("must fail");
        assert!(err.to_string().contains("../etc/passwd"), "{err}");
    }
}
