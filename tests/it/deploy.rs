//! The shipped deployment files: each kustomize overlay rendered by `kubectl kustomize` has
//! what a platform team expects (namespace, network policy, spread, no API token, a release
//! tag, the spool volume), its ConfigMap's runner config passes `check-config`, and the
//! Prometheus Operator's rules are the plain rules file's. (`scripts/test` also runs
//! `kubernetes-validate --strict` and checkov over the rendered overlays.)

use std::path::Path;

use crate::helpers::{binary, write_config};

/// `kubectl kustomize deploy/k8s/<dir>`: the rendered resources.
fn render(dir: &str) -> Vec<serde_json::Value> {
    let out = std::process::Command::new("kubectl")
        .args([
            "kustomize",
            &format!("{}/deploy/k8s/{dir}", env!("CARGO_MANIFEST_DIR")),
        ])
        .output()
        .expect("kubectl (scripts/test installs it)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{dir}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    text.split("\n---\n")
        .map(|doc| serde_saphyr::from_str(doc).expect("rendered YAML"))
        .collect()
}

fn of_kind<'a>(docs: &'a [serde_json::Value], kind: &str) -> &'a serde_json::Value {
    docs.iter()
        .find(|d| d["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind} rendered"))
}

#[test]
fn each_overlay_renders_what_a_platform_team_expects() {
    let version = env!("CARGO_PKG_VERSION");
    for (overlay, workload) in [
        ("overlays/deployment", "Deployment"),
        ("overlays/cronjob", "CronJob"),
    ] {
        let docs = render(overlay);
        for d in &docs {
            if d["kind"] != "Namespace" {
                assert_eq!(
                    d["metadata"]["namespace"], "trading-signals",
                    "{overlay}: {d}"
                );
            }
            assert_eq!(
                d["metadata"]["labels"]["app.kubernetes.io/name"],
                "autonomous-runner"
            );
        }
        of_kind(&docs, "Namespace");
        let w = of_kind(&docs, workload);
        let pod = if workload == "CronJob" {
            &w["spec"]["jobTemplate"]["spec"]["template"]["spec"]
        } else {
            &w["spec"]["template"]["spec"]
        };
        assert_eq!(pod["automountServiceAccountToken"], false, "{overlay}");
        assert_eq!(pod["serviceAccountName"], "autonomous-runner", "{overlay}");
        let c = &pod["containers"][0];
        assert_eq!(
            c["image"],
            format!("tradestream/autonomous-runner:{version}"),
            "{overlay}: the release's tag, never latest"
        );
        assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
        // The spool path of the config is on a writable volume.
        let cm = of_kind(&docs, "ConfigMap");
        let runner: serde_json::Value =
            serde_saphyr::from_str(cm["data"]["runner.yaml"].as_str().expect("runner.yaml"))
                .expect("YAML");
        let spool = runner["autonomous_runner"]["publish"]["spool_path"]
            .as_str()
            .expect("spool_path");
        let mounted = c["volumeMounts"]
            .as_array()
            .expect("mounts")
            .iter()
            .any(|m| {
                spool.starts_with(m["mountPath"].as_str().unwrap_or("?")) && m["readOnly"] != true
            });
        assert!(mounted, "{overlay}: {spool} is on no writable volume");
        // Network: in only to the HTTP port; out to DNS, Redis, PostgreSQL, HTTPS.
        let np = of_kind(&docs, "NetworkPolicy");
        assert_eq!(
            np["spec"]["policyTypes"],
            serde_json::json!(["Ingress", "Egress"])
        );
        let ports = |rules: &serde_json::Value| -> Vec<u64> {
            rules
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|r| r["ports"].as_array().cloned().unwrap_or_default())
                .filter_map(|p| p["port"].as_u64())
                .collect()
        };
        assert_eq!(ports(&np["spec"]["ingress"]), vec![8080]);
        let mut egress = ports(&np["spec"]["egress"]);
        egress.sort_unstable();
        egress.dedup();
        assert_eq!(egress, vec![53, 443, 5432, 6379]);
        if workload == "Deployment" {
            // A node loss takes at most one replica: the PDB's standby survives it.
            let spread = pod["topologySpreadConstraints"].as_array().expect("spread");
            assert!(
                spread
                    .iter()
                    .any(|t| t["topologyKey"] == "kubernetes.io/hostname"
                        && t["whenUnsatisfiable"] == "DoNotSchedule")
            );
            assert_eq!(
                of_kind(&docs, "PodDisruptionBudget")["spec"]["minAvailable"],
                1
            );
        }
    }
}

#[test]
fn the_prometheus_rule_carries_the_plain_rules_files_groups() {
    let docs = render("monitoring");
    let rule = of_kind(&docs, "PrometheusRule");
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/prometheus/alerts.yaml"),
    )
    .unwrap();
    let plain: serde_json::Value = serde_saphyr::from_str(&text).expect("alerts.yaml");
    assert_eq!(rule["spec"]["groups"], plain["groups"]);
    let sm = of_kind(&docs, "ServiceMonitor");
    assert_eq!(sm["spec"]["endpoints"][0]["port"], "http");
    assert_eq!(
        sm["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"],
        "autonomous-runner"
    );
}

#[test]
fn the_configmap_config_passes_check_config() {
    let docs = render("overlays/deployment");
    let cm = of_kind(&docs, "ConfigMap");
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
