//! Command-line interface of the `meridian` binary.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use tokio::sync::watch;

use crate::config::{Config, ConfigError};
use crate::server;

/// Meridian: a self-hosted, multi-region IoT hub compatible with the Azure IoT SDKs.
#[derive(Debug, Parser)]
#[command(name = "meridian", version)]
pub struct Cli {
    /// What to run.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Runs a single-node hub with embedded defaults (generated test CA and server certificate,
    /// local data dir) and prints its connection string.
    Dev(DevArgs),
    /// Runs a cluster node from a configuration file.
    Node(NodeArgs),
    /// Checks a configuration file and prints the effective configuration.
    CheckConfig(NodeArgs),
}

/// `meridian dev`
#[derive(Debug, Args)]
pub struct DevArgs {
    /// Data directory.
    #[arg(long, default_value = "meridian-data")]
    pub data_dir: PathBuf,
    /// HTTPS service API port (Azure uses 443).
    #[arg(long, default_value_t = 8443)]
    pub https_port: u16,
    /// MQTT/TLS device port (the Azure device SDKs dial 8883).
    #[arg(long, default_value_t = 8883)]
    pub mqtt_port: u16,
    /// Node-to-node gRPC port (loopback only in dev).
    #[arg(long, default_value_t = 7101)]
    pub grpc_port: u16,
    /// Prometheus metrics port; 0 disables the endpoint.
    #[arg(long, default_value_t = 9464)]
    pub metrics_port: u16,
    /// PEM server certificate chain instead of the generated one.
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for `--tls-cert`.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
}

/// `meridian node`
#[derive(Debug, Args)]
pub struct NodeArgs {
    /// TOML configuration file (see deploy/config/meridian.example.toml).
    #[arg(long)]
    pub config: PathBuf,
    /// Overrides `node.data_dir`.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
}

impl DevArgs {
    /// The configuration `dev` runs with: defaults, environment overrides, then these flags.
    pub fn config(&self, env: &HashMap<String, String>) -> Result<Config, ConfigError> {
        let mut config = Config::load(None, env)?;
        config.node.data_dir = self.data_dir.clone();
        config.api.https_listen = SocketAddr::from((Ipv4Addr::LOCALHOST, self.https_port));
        config.cluster.grpc_listen = SocketAddr::from((Ipv4Addr::LOCALHOST, self.grpc_port));
        config.mqtt.tls_listen = SocketAddr::from((Ipv4Addr::LOCALHOST, self.mqtt_port));
        config.cluster.members.clear();
        config.observability.metrics_listen = (self.metrics_port != 0)
            .then(|| SocketAddr::from((Ipv4Addr::LOCALHOST, self.metrics_port)));
        config.tls.cert = self.tls_cert.clone();
        config.tls.key = self.tls_key.clone();
        config.validate()?;
        Ok(config)
    }
}

impl NodeArgs {
    /// The configuration: file, environment overrides, then these flags.
    pub fn config(&self, env: &HashMap<String, String>) -> Result<Config, ConfigError> {
        let mut config = Config::load(Some(&self.config), env)?;
        if let Some(d) = &self.data_dir {
            config.node.data_dir = d.clone();
        }
        config.validate()?;
        Ok(config)
    }
}

/// Waits for SIGINT or SIGTERM and flips the shutdown signal.
pub fn shutdown_on_signal() -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        let term = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        #[cfg(not(unix))]
        let term = std::future::pending::<()>();
        tokio::select! {
            _ = ctrl_c => {}
            _ = term => {}
        }
        tracing::info!("shutting down");
        let _ = tx.send(true);
    });
    rx
}

/// Runs `meridian dev`: starts the node, waits for the hub, prints and saves the credentials to
/// `<data-dir>/dev-credentials.json`.
pub async fn run_dev(config: Config) -> anyhow::Result<()> {
    let shutdown = shutdown_on_signal();
    let node = server::start(config.clone(), shutdown).await?;
    let credentials = node
        .credentials(Duration::from_secs(30))
        .await
        .ok_or_else(|| anyhow::anyhow!("the hub was not created within 30 s"))?;
    let path = config.node.data_dir.join("dev-credentials.json");
    server::write_credentials(&path, &credentials)?;
    println!("Meridian dev hub is ready.");
    println!(
        "  service connection string: {}",
        credentials.service_connection_string
    );
    if let Some(ca) = &credentials.ca_cert {
        println!("  CA certificate (trust it in clients): {}", ca.display());
    }
    println!("  HTTPS service API: https://{}", node.https_addr);
    println!(
        "  MQTT device endpoint: mqtts://{} (and wss://{}/$iothub/websocket)",
        node.mqtt_addr, node.https_addr
    );
    println!("  credentials written to {}", path.display());
    node.join().await;
    Ok(())
}
