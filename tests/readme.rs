//! The README cannot drift from the parser: every YAML block in it that is a pgvigil config, a
//! targets file or a collector pack passes `pgvigil check-config` (with its marked placeholders
//! made real), the other YAML blocks (Prometheus and Alertmanager snippets) are YAML, and the
//! collector table names every built-in collector with its pack.

mod common;

use std::path::Path;
use std::process::Command;

use common::binary::command as pgvigil;
use common::write;

const README: &str = include_str!("../README.md");

/// Top-level keys of YAML blocks that belong to other programs.
const FOREIGN_KEYS: &[&str] = &[
    "rule_files",
    "inhibit_rules",
    "scrape_configs",
    "global",
    "groups",
    "apiVersion",
    "route",
];

/// The fenced blocks of `lang`, with the line each starts on.
fn blocks(lang: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut current: Option<(usize, String, usize)> = None;
    for (i, line) in README.lines().enumerate() {
        let trimmed = line.trim_start();
        let indent = line.len() - trimmed.len();
        match &mut current {
            None if trimmed == format!("```{lang}") => {
                current = Some((i + 1, String::new(), indent))
            }
            Some((start, text, _)) if trimmed == "```" => {
                out.push((*start, std::mem::take(text)));
                current = None;
            }
            Some((_, text, indent)) => {
                text.push_str(line.get(*indent..).unwrap_or(line.trim_start()));
                text.push('\n');
            }
            None => {}
        }
    }
    out
}

/// A self-signed CA certificate (PEM), for the `sslrootcert` placeholders.
fn ca_certificate(dir: &Path) -> std::path::PathBuf {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=ca",
            "-keyout", "ca.key", "-out", "ca.crt",
        ])
        .output()
        .expect("openssl (apt-get install openssl)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    dir.join("ca.crt")
}

#[test]
fn every_config_and_pack_block_passes_check_config() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca_certificate(dir.path());
    let secret = write(dir.path(), "secret", "hunter2\n");
    let packs = dir.path().join("queries");
    std::fs::create_dir(&packs).unwrap();
    let yaml = blocks("yaml");
    // The web.yml example, with the certificate files it names made real; the configs that
    // name /etc/pgvigil/web.yml get it.
    let web = dir.path().join("web.yml");
    let (web_line, web_text) = yaml
        .iter()
        .find(|(_, t)| t.starts_with("tls_server_config:"))
        .expect("README has a web.yml example");
    let web_dir = dir.path();
    for name in ["tls.crt", "tls.key", "clients-ca.crt"] {
        assert!(web_text.contains(name), "README.md:{web_line}: {name}");
    }
    std::fs::copy(&ca, web_dir.join("tls.crt")).unwrap();
    std::fs::copy(dir.path().join("ca.key"), web_dir.join("tls.key")).unwrap();
    std::fs::copy(&ca, web_dir.join("clients-ca.crt")).unwrap();
    std::fs::write(&web, web_text).unwrap();
    let out = pgvigil()
        .arg("check-config")
        .arg(write(
            dir.path(),
            "with-web.yaml",
            &format!(
                "web_config_file: {}\ntargets:\n  - name: a\n    dsn: host=db.example\n",
                web.display()
            ),
        ))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "README.md:{web_line}: the web.yml example does not load:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The placeholders the README marks, made real.
    let substitute = |text: &str| {
        text.replace("/etc/pgvigil/ca.crt", ca.to_str().unwrap())
            .replace("/run/secrets/pgvigil", secret.to_str().unwrap())
            .replace("/etc/pgvigil/queries", packs.to_str().unwrap())
            .replace("/etc/pgvigil/web.yml", web.to_str().unwrap())
    };
    assert!(yaml.len() >= 4, "README yaml blocks: {}", yaml.len());
    let (mut configs, mut packs_checked, mut foreign, mut targets_files) = (0, 0, 0, 0);
    for (line, text) in &yaml {
        let value: serde_yaml_ng::Value = serde_yaml_ng::from_str(text)
            .unwrap_or_else(|e| panic!("README.md:{line}: not YAML: {e}\n{text}"));
        if value.is_sequence() {
            // A targets file (`targets_files`): checked as the only file of a config.
            let targets = write(
                dir.path(),
                &format!("targets-{line}.yaml"),
                &substitute(text),
            );
            let config = write(
                dir.path(),
                &format!("block-{line}.yaml"),
                &format!("targets_files: [\"{}\"]\n", targets.display()),
            );
            let out = pgvigil().arg("check-config").arg(&config).output().unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success() && stdout.contains("config OK"),
                "README.md:{line}: the targets file does not load:\n{}\n--- block ---\n{text}",
                String::from_utf8_lossy(&out.stderr)
            );
            targets_files += 1;
            continue;
        }
        let first_key = value
            .as_mapping()
            .and_then(|m| m.keys().next())
            .and_then(|k| k.as_str())
            .unwrap_or_else(|| panic!("README.md:{line}: a YAML block that is not a mapping"));
        if first_key == "tls_server_config" {
            continue; // the web.yml example, checked above
        }
        if FOREIGN_KEYS.contains(&first_key) {
            foreign += 1;
            continue;
        }
        let is_pack = value.get("collectors").is_some_and(|c| c.is_sequence());
        let file = write(dir.path(), &format!("block-{line}.yaml"), &substitute(text));
        let out = pgvigil()
            .arg("check-config")
            .arg(&file)
            .env_remove("DATA_SOURCE_NAME")
            .output()
            .expect("run pgvigil check-config");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "README.md:{line}: check-config failed:\n{}\n--- block ---\n{text}",
            String::from_utf8_lossy(&out.stderr)
        );
        if is_pack {
            assert!(stdout.contains("pack OK"), "README.md:{line}: {stdout}");
            packs_checked += 1;
        } else {
            assert!(stdout.contains("config OK"), "README.md:{line}: {stdout}");
            configs += 1;
        }
    }
    println!("README yaml blocks: {configs} configs, {packs_checked} packs, {targets_files} targets files, {foreign} foreign");
    assert!(configs >= 3, "the minimal, complete and tracing configs");
    assert!(packs_checked >= 1, "the pack example");
    assert!(targets_files >= 1, "the targets file example");
}

#[test]
fn the_collector_table_names_every_built_in_collector_and_its_pack() {
    let dir = tempfile::tempdir().unwrap();
    let config = write(
        dir.path(),
        "c.yaml",
        "targets:\n  - name: a\n    dsn: host=db.example\n",
    );
    let out = pgvigil().arg("check-config").arg(&config).output().unwrap();
    let plan = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{plan}");
    let mut seen = 0;
    for line in plan.lines() {
        // "  name [scope] every …, from queries/x.yaml"
        let Some(rest) = line.strip_prefix("  ") else {
            continue;
        };
        let Some((name, _)) = rest.split_once(" [") else {
            continue;
        };
        let Some((_, pack)) = rest.rsplit_once(", from ") else {
            continue;
        };
        let row = format!("| `{name}` | `{pack}` |");
        assert!(
            README.contains(&row),
            "README's collector table lacks the row starting {row}"
        );
        seen += 1;
    }
    assert!(seen >= 20, "collectors found in the plan: {seen}\n{plan}");
}
