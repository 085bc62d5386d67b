//! Node configuration: one struct per section, loaded in layers: defaults < TOML file < environment
//! (`MERIDIAN_<SECTION>__<KEY>`) < command-line flags. Libraries never read the environment
//! themselves; [`Config::load`] takes it as a map so tests control it.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::domain::twin::TwinLimits;

/// Configuration errors.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("read {path}: {source}")]
    Read {
        /// File path.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The TOML (or an environment override) does not fit the schema.
    #[error("parse config: {0}")]
    Parse(String),
    /// A value is out of range or inconsistent.
    #[error("invalid config: {0}")]
    Invalid(String),
}

/// The whole node configuration.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// This node's identity and data directory.
    pub node: NodeSection,
    /// Raft group membership and timing.
    pub cluster: ClusterSection,
    /// The service REST API.
    pub api: ApiSection,
    /// TLS material for the public listeners.
    pub tls: TlsSection,
    /// Hub-wide settings applied when the hub is created.
    pub hub: HubSection,
    /// The MQTT device endpoint.
    pub mqtt: crate::mqtt::MqttSection,
    /// The AMQP endpoint (service C2D/feedback, Event Hub-compatible telemetry).
    pub amqp: crate::amqp::AmqpSection,
    /// Logs, traces and metrics.
    pub observability: ObservabilitySection,
    /// The hub's other regions and the failover policy (geo-paired hubs).
    pub region: crate::region::RegionSection,
}

/// `[node]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeSection {
    /// Raft node id, unique in the cluster (default 1).
    pub id: u64,
    /// Where RocksDB, TLS material and generated credentials live (default `./meridian-data`).
    pub data_dir: PathBuf,
    /// Region this node runs in (default `local`), announced over gossip.
    pub region: String,
}

impl Default for NodeSection {
    fn default() -> Self {
        Self {
            id: 1,
            data_dir: PathBuf::from("meridian-data"),
            region: "local".into(),
        }
    }
}

/// One voter of the static bootstrap membership.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Member {
    /// Raft node id.
    pub id: u64,
    /// Its gRPC address (`host:port`).
    pub grpc_addr: String,
    /// Its region, when the cluster spans regions (sync mode): telemetry partition replicas are
    /// spread over regions. Defaults to unknown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
}

/// `[cluster]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterSection {
    /// Address the node-to-node gRPC server listens on (default `127.0.0.1:7101`).
    pub grpc_listen: SocketAddr,
    /// Address other nodes dial; defaults to `grpc_listen`.
    pub grpc_advertise: Option<String>,
    /// Initial voters. Empty means a single-node group of this node. The lowest id initializes the
    /// group on first start; the others wait to be contacted.
    pub members: Vec<Member>,
    /// Leader heartbeat period in ms (default 150).
    pub heartbeat_interval_ms: u64,
    /// Lower bound of the election timeout in ms (default 600).
    pub election_timeout_min_ms: u64,
    /// Upper bound of the election timeout in ms (default 1200).
    pub election_timeout_max_ms: u64,
    /// Build a snapshot after this many log entries since the last one (default 5000).
    pub snapshot_every_logs: u64,
    /// Hub group only: also wait this many entries per registered device and persistent session
    /// (default 1; 0 = `snapshot_every_logs` alone). Its snapshot is the whole registry, so a
    /// large registry is snapshotted proportionally less often and the cost per entry stays flat.
    pub hub_snapshot_logs_per_item: u64,
    /// Log entries to keep behind the snapshot for lagging followers (default 1000).
    pub max_in_snapshot_log_to_keep: u64,
    /// How long a client request may wait for the cluster (leader election, forwarding) in ms
    /// (default 10000).
    pub request_timeout_ms: u64,
    /// Replicas of each telemetry partition (default 3; fewer when the cluster has fewer voters).
    /// An append is acknowledged once a majority of them stored it.
    pub replication_factor: usize,
}

impl Default for ClusterSection {
    fn default() -> Self {
        Self {
            grpc_listen: SocketAddr::from(([127, 0, 0, 1], 7101)),
            grpc_advertise: None,
            members: Vec::new(),
            heartbeat_interval_ms: 150,
            election_timeout_min_ms: 600,
            election_timeout_max_ms: 1200,
            snapshot_every_logs: 5000,
            hub_snapshot_logs_per_item: 1,
            max_in_snapshot_log_to_keep: 1000,
            request_timeout_ms: 10_000,
            replication_factor: 3,
        }
    }
}

impl ClusterSection {
    /// The address peers use for this node.
    pub fn advertise(&self) -> String {
        self.grpc_advertise
            .clone()
            .unwrap_or_else(|| self.grpc_listen.to_string())
    }
}

/// `[api]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApiSection {
    /// Address of the HTTPS service API (default `127.0.0.1:8443`; Azure uses 443).
    pub https_listen: SocketAddr,
    /// The hub host name clients put in `HostName=` (default `localhost:<https port>`).
    pub host_name: Option<String>,
    /// Largest request body in bytes (default 1 MiB).
    pub max_body_bytes: usize,
}

impl Default for ApiSection {
    fn default() -> Self {
        Self {
            https_listen: SocketAddr::from(([127, 0, 0, 1], 8443)),
            host_name: None,
            max_body_bytes: 1024 * 1024,
        }
    }
}

impl ApiSection {
    /// The advertised host name.
    pub fn host_name(&self) -> String {
        self.host_name
            .clone()
            .unwrap_or_else(|| format!("localhost:{}", self.https_listen.port()))
    }
}

/// `[tls]`
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsSection {
    /// PEM server certificate chain. When absent, a test CA and a server certificate for
    /// `localhost` and `127.0.0.1` are generated under `<data_dir>/tls` and reused after that.
    pub cert: Option<PathBuf>,
    /// PEM private key matching `cert`.
    pub key: Option<PathBuf>,
}

/// `[hub]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HubSection {
    /// Most devices in the registry (Azure: 1,000,000).
    pub max_devices: u64,
    /// Most modules per device (Azure: 20).
    pub max_modules_per_device: usize,
    /// Twin document limits.
    pub twin_limits: TwinLimits,
    /// Routing and consumer-group limits.
    pub routing_limits: crate::domain::routing::RoutingLimits,
}

impl Default for HubSection {
    fn default() -> Self {
        Self {
            max_devices: 1_000_000,
            max_modules_per_device: 20,
            twin_limits: TwinLimits::default(),
            routing_limits: Default::default(),
        }
    }
}

/// `[observability]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ObservabilitySection {
    /// `tracing` filter (default `info`); `RUST_LOG` style.
    pub log_filter: String,
    /// Emit logs as JSON lines instead of text (default false).
    pub json_logs: bool,
    /// OTLP/gRPC collector endpoint for traces (e.g. `http://127.0.0.1:4317`); none by default.
    pub otlp_endpoint: Option<String>,
    /// Plain-HTTP Prometheus endpoint (`GET /metrics`), default `127.0.0.1:9464`; unset to disable.
    pub metrics_listen: Option<SocketAddr>,
}

impl Default for ObservabilitySection {
    fn default() -> Self {
        Self {
            log_filter: "info,openraft=warn".into(),
            json_logs: false,
            otlp_endpoint: None,
            metrics_listen: Some(SocketAddr::from(([127, 0, 0, 1], 9464))),
        }
    }
}

/// Prefix of environment overrides.
pub const ENV_PREFIX: &str = "MERIDIAN_";

impl Config {
    /// Loads `path` (if any) over the defaults, then applies `MERIDIAN_<SECTION>__<KEY>` overrides
    /// from `env` (values parsed as TOML, falling back to a string), then validates.
    pub fn load(path: Option<&Path>, env: &HashMap<String, String>) -> Result<Self, ConfigError> {
        let mut table = match path {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                    path: p.to_path_buf(),
                    source,
                })?;
                text.parse::<toml::Table>()
                    .map_err(|e| ConfigError::Parse(e.to_string()))?
            }
            None => toml::Table::new(),
        };
        let overrides: BTreeMap<&String, &String> = env
            .iter()
            .filter(|(k, _)| k.starts_with(ENV_PREFIX) && k.contains("__"))
            .collect();
        for (key, value) in overrides {
            let path: Vec<String> = key[ENV_PREFIX.len()..]
                .split("__")
                .map(str::to_ascii_lowercase)
                .collect();
            set_path(&mut table, &path, parse_env_value(value))?;
        }
        let config: Config = toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::Parse(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    /// Checks ranges and cross-field rules.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let c = &self.cluster;
        if c.heartbeat_interval_ms == 0 || c.heartbeat_interval_ms >= c.election_timeout_min_ms {
            return Err(ConfigError::Invalid(
                "cluster.heartbeat_interval_ms must be > 0 and below election_timeout_min_ms"
                    .into(),
            ));
        }
        if c.election_timeout_min_ms >= c.election_timeout_max_ms {
            return Err(ConfigError::Invalid(
                "cluster.election_timeout_min_ms must be below election_timeout_max_ms".into(),
            ));
        }
        if !c.members.is_empty() && !c.members.iter().any(|m| m.id == self.node.id) {
            return Err(ConfigError::Invalid(format!(
                "node.id {} is not among cluster.members",
                self.node.id
            )));
        }
        let mut ids: Vec<u64> = c.members.iter().map(|m| m.id).collect();
        ids.sort_unstable();
        ids.dedup();
        if ids.len() != c.members.len() {
            return Err(ConfigError::Invalid(
                "cluster.members has duplicate ids".into(),
            ));
        }
        if c.replication_factor == 0 || c.replication_factor > 7 {
            return Err(ConfigError::Invalid(
                "cluster.replication_factor must be 1 to 7".into(),
            ));
        }
        if self.tls.cert.is_some() != self.tls.key.is_some() {
            return Err(ConfigError::Invalid(
                "tls.cert and tls.key must be given together".into(),
            ));
        }
        if self.mqtt.partitions == 0 || self.mqtt.partitions > 1024 {
            return Err(ConfigError::Invalid(
                "mqtt.partitions must be 1 to 1024".into(),
            ));
        }
        self.region
            .validate(&self.node.region)
            .map_err(ConfigError::Invalid)?;
        if self.hub.max_modules_per_device == 0 || self.hub.max_devices == 0 {
            return Err(ConfigError::Invalid("hub limits must be positive".into()));
        }
        Ok(())
    }

    /// The initial voters: `cluster.members`, or this node alone.
    pub fn members(&self) -> Vec<Member> {
        if self.cluster.members.is_empty() {
            vec![Member {
                id: self.node.id,
                grpc_addr: self.cluster.advertise(),
                region: Some(self.node.region.clone()),
            }]
        } else {
            self.cluster.members.clone()
        }
    }
}

fn parse_env_value(value: &str) -> toml::Value {
    // `key = <value>` parses numbers, booleans, arrays and inline tables; anything else is a string.
    format!("v = {value}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(value.to_string()))
}

fn set_path(
    table: &mut toml::Table,
    path: &[String],
    value: toml::Value,
) -> Result<(), ConfigError> {
    match path {
        [] => Err(ConfigError::Parse("empty environment key".into())),
        [last] => {
            table.insert(last.clone(), value);
            Ok(())
        }
        [first, rest @ ..] => {
            let entry = table
                .entry(first.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            match entry {
                toml::Value::Table(t) => set_path(t, rest, value),
                _ => Err(ConfigError::Parse(format!("{first} is not a section"))),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_file_parses_and_validates() {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/config/meridian.example.toml");
        let config = Config::load(Some(&path), &HashMap::new()).expect("example config loads");
        assert_eq!(config.members().len(), 3);
        assert_eq!(config.hub.twin_limits.max_depth, 5);
        assert_eq!(config.region.peers.len(), 2);
        assert!(config.region.automatic_failover);
    }

    #[test]
    fn env_overrides_file_and_defaults() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "[node]\nid = 2\n[api]\nhttps_listen = \"127.0.0.1:9000\"\n",
        )
        .expect("write");
        let env = HashMap::from([
            ("MERIDIAN_NODE__ID".to_string(), "3".to_string()),
            (
                "MERIDIAN_OBSERVABILITY__LOG_FILTER".to_string(),
                "debug".to_string(),
            ),
            ("UNRELATED".to_string(), "x".to_string()),
        ]);
        let config = Config::load(Some(&path), &env).expect("loads");
        assert_eq!(config.node.id, 3);
        assert_eq!(config.api.https_listen.port(), 9000);
        assert_eq!(config.observability.log_filter, "debug");
        assert_eq!(config.api.host_name(), "localhost:9000");
    }

    #[test]
    fn rejects_unknown_keys_and_bad_timing() {
        let env = HashMap::from([("MERIDIAN_NODE__COLOUR".to_string(), "red".to_string())]);
        assert!(matches!(
            Config::load(None, &env),
            Err(ConfigError::Parse(_))
        ));
        let env = HashMap::from([(
            "MERIDIAN_CLUSTER__HEARTBEAT_INTERVAL_MS".to_string(),
            "5000".to_string(),
        )]);
        assert!(matches!(
            Config::load(None, &env),
            Err(ConfigError::Invalid(_))
        ));
    }
}
