//! The shipped deployment files: the ConfigMap's runner config passes `check-config`.

use std::path::Path;

use crate::helpers::{binary, write_config};

#[test]
fn the_configmap_config_passes_check_config() {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/k8s/configmap.yaml"),
    )
    .unwrap();
    let cm: serde_json::Value = serde_saphyr::from_str(&text).expect("configmap.yaml is YAML");
    let runner = cm["data"]["runner.yaml"]
        .as_str()
        .expect("data.runner.yaml");
    let f = write_config(runner);
    let out = std::process::Command::new(binary())
        .args(["check-config", "--config", f.path.to_str().unwrap()])
        .env_clear()
        .env("REDIS_URL", "redis://redis:6379")
        .env("OPENROUTER_API_KEY", "sk-or-test")
        .env("HOSTNAME", "autonomous-runner-abc")
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(printed.contains("backend: redis"));
    assert!(printed.contains("instance_id: autonomous-runner-abc"));
}

#[test]
fn the_seed_config_file_passes_check_config() {
    let out = std::process::Command::new(binary())
        .args([
            "check-config",
            "--config",
            concat!(env!("CARGO_MANIFEST_DIR"), "/config/seed.yaml"),
        ])
        .env_clear()
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
