//! The command line: every mode's and every client command's arguments (clap). Parsing only;
//! [`crate::modes`] and [`crate::client`] act on them.

use std::path::PathBuf;

use crate::engine_args::{AgentTlsArgs, EngineArgs, TlsFileArgs};
use clap::{Parser, Subcommand};

use crate::output::Output;

#[derive(Debug, Parser)]
#[command(version, about = "qsd-csi: Kubernetes CSI volumes on QEMU's block layer")]
pub struct Cli {
    /// The CSI endpoint to serve (standalone) or to drive (every other command).
    #[arg(
        long,
        global = true,
        env = "CSI_ENDPOINT",
        default_value = "unix:///var/lib/qsd-csi/csi.sock"
    )]
    pub endpoint: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve Identity, Controller and Node on one unix socket, engine in-process.
    Standalone(Standalone),
    /// Cluster node plugin: Identity + Node on the endpoint, the node agent over mutual TLS.
    Node(NodeMode),
    /// Cluster controller: Identity + Controller on the endpoint, node agents over mutual TLS.
    Controller(ControllerMode),
    /// Create, list or delete volumes.
    #[command(subcommand)]
    Volume(VolumeCmd),
    /// Create, list or delete snapshots.
    #[command(subcommand)]
    Snapshot(SnapshotCmd),
    /// Certificates for node agents on hosts without Kubernetes.
    #[command(subcommand)]
    Certs(CertsCmd),
    /// Check pools on this host, reading their directories (no driver needed).
    #[command(subcommand)]
    Pool(PoolCmd),
    /// Copy a volume into a new one (point-in-time, while the source stays in use).
    Clone {
        /// The source volume's ID.
        source: String,
        /// The new volume's name.
        name: String,
        /// Size of the clone (default: the source's), e.g. 20G.
        #[arg(long)]
        size: Option<String>,
        /// Output format: table (default), wide, json, yaml or name (the bare ID).
        #[arg(short = 'o', long = "output", value_enum, default_value_t)]
        output: Output,
    },
    /// Grow a volume; if `qsd-csi publish` staged it here, its device and filesystem too.
    Expand {
        /// The volume's ID.
        volume: String,
        /// The new size, e.g. 20G.
        size: String,
        /// Where the CLI stages volumes.
        #[arg(long, default_value = "/var/lib/qsd-csi/cli-staging")]
        staging_dir: PathBuf,
    },
    /// Attach a volume on this host and mount it at a path (or bind its device with --block).
    Publish {
        /// The volume's ID.
        volume: String,
        /// A directory to mount on, or (with --block) a file to bind the device onto.
        path: PathBuf,
        /// Publish the raw block device instead of a filesystem.
        #[arg(long)]
        block: bool,
        /// Filesystem to create on first use: ext4 or xfs.
        #[arg(long, default_value = "ext4")]
        fs_type: String,
        /// Mount read-only.
        #[arg(long)]
        read_only: bool,
        /// The volume context the CO would pass (a PersistentVolume's volumeAttributes), e.g.
        /// writeThresholdPercent=80. Repeatable.
        #[arg(long = "context", value_name = "KEY=VALUE")]
        context: Vec<String>,
        /// Where the CLI stages volumes.
        #[arg(long, default_value = "/var/lib/qsd-csi/cli-staging")]
        staging_dir: PathBuf,
    },
    /// Unmount a published volume and detach it.
    Unpublish {
        /// The volume's ID.
        volume: String,
        /// The path given to publish.
        path: PathBuf,
        /// Where the CLI stages volumes.
        #[arg(long, default_value = "/var/lib/qsd-csi/cli-staging")]
        staging_dir: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum VolumeCmd {
    /// Create a volume (empty, or from a snapshot).
    Create {
        /// Its name.
        name: String,
        /// Its size, e.g. 10G.
        #[arg(long, default_value = "1G")]
        size: String,
        /// The pool (default: the driver's default pool).
        #[arg(long)]
        pool: Option<String>,
        /// off, metadata, falloc or full.
        #[arg(long)]
        preallocation: Option<String>,
        /// Restore this snapshot into the new volume (a linked overlay).
        #[arg(long)]
        from_snapshot: Option<String>,
        /// Any other StorageClass parameter, e.g. clusterSize=128Ki, extendedL2=true,
        /// l2CacheSize=4Mi, iopsTotal=500. Repeatable.
        #[arg(long = "param", value_name = "KEY=VALUE")]
        params: Vec<String>,
        /// Output format: table (default), wide, json, yaml or name (the bare ID).
        #[arg(short = 'o', long = "output", value_enum, default_value_t)]
        output: Output,
    },
    /// List volumes.
    List {
        /// Output format: table (default), wide, json, yaml or name (the bare ID).
        #[arg(short = 'o', long = "output", value_enum, default_value_t)]
        output: Output,
    },
    /// Delete a volume (refused while it is published).
    Delete {
        /// The volume's ID.
        volume: String,
    },
    /// Copy a volume (as of now, while it stays in use) or a snapshot onto another node:
    /// only its allocated data crosses the network (NBD with TLS).
    Copy {
        /// The volume's or snapshot's ID.
        source: String,
        /// The node to copy it to.
        #[arg(long)]
        to: String,
        /// The copy's name (default: the source's name; IDs name their node).
        #[arg(long)]
        name: Option<String>,
        /// Output format: table (default), wide, json, yaml or name (the bare ID).
        #[arg(short = 'o', long = "output", value_enum, default_value_t)]
        output: Output,
    },
    /// Move a volume that is not published onto another node: copy it, then delete the
    /// original (kept, and said so, if that fails).
    Move {
        /// The volume's ID.
        volume: String,
        /// The node to move it to.
        #[arg(long)]
        to: String,
        /// Output format: table (default), wide, json, yaml or name (the bare ID).
        #[arg(short = 'o', long = "output", value_enum, default_value_t)]
        output: Output,
    },
}

#[derive(Debug, Subcommand)]
pub enum SnapshotCmd {
    /// Take a snapshot of a volume (O(1), also while it is in use).
    Create {
        /// The volume's ID.
        volume: String,
        /// The snapshot's name.
        name: String,
        /// Output format: table (default), wide, json, yaml or name (the bare ID).
        #[arg(short = 'o', long = "output", value_enum, default_value_t)]
        output: Output,
    },
    /// List snapshots, optionally of one volume.
    List {
        /// Only snapshots of this volume.
        #[arg(long)]
        volume: Option<String>,
        /// Output format: table (default), wide, json, yaml or name (the bare ID).
        #[arg(short = 'o', long = "output", value_enum, default_value_t)]
        output: Output,
    },
    /// Delete a snapshot (its data stays while volumes need it).
    Delete {
        /// The snapshot's ID.
        snapshot: String,
    },
    /// Changed-block tracking: the byte ranges TARGET holds data for, or with BASE, those
    /// written after BASE up to TARGET (whole qcow2 clusters), one "OFFSET LENGTH" per line.
    Changes {
        /// [BASE] TARGET: an older snapshot of the same volume (optional), then the snapshot.
        #[arg(num_args = 1..=2, required = true, value_names = ["BASE", "TARGET"])]
        snapshots: Vec<String>,
        /// Print one JSON document: {"volume_size_bytes": N, "ranges": [{"offset", "length"}]}.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, clap::Args)]
pub struct Standalone {
    #[command(flatten)]
    pub engine: EngineArgs,
    /// Serve Prometheus metrics (GET /metrics, text format) here: volumes, pools, the daemon,
    /// every gRPC call.
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Kernel device backend: auto, ublk, nbd or fuse.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Volumes this node advertises it can hold.
    #[arg(long, default_value_t = 256)]
    pub max_volumes: i64,
}

#[derive(Debug, clap::Args)]
pub struct NodeMode {
    #[command(flatten)]
    pub node: Standalone,
    /// Where the node agent listens for the controller (mutual TLS).
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:9443")]
    pub agent_listen: std::net::SocketAddr,
    #[command(flatten)]
    pub tls: AgentTlsArgs,
    #[command(flatten)]
    pub health: HealthArgs,
}

#[derive(Debug, clap::Args)]
pub struct HealthArgs {
    /// Serve the gRPC health service (grpc.health.v1, for Kubernetes' gRPC probes) here:
    /// SERVING while CSI Probe would answer ready.
    #[arg(long, value_name = "ADDR")]
    pub health_listen: Option<std::net::SocketAddr>,
}

#[derive(Debug, clap::Args)]
pub struct ControllerMode {
    /// A node agent: NAME=HOST:PORT (its certificate must name NAME). Repeat for each node.
    #[arg(long = "agent", value_name = "NAME=ADDR", required_unless_present = "discover_agents")]
    pub agents: Vec<String>,
    /// Find the node agents from the Kubernetes API instead: node plugin pods matching this
    /// label selector (in --namespace), listed at start and every 30 s.
    #[arg(long, value_name = "SELECTOR", conflicts_with = "agents")]
    pub discover_agents: Option<String>,
    /// The node plugin pods' namespace (discovery).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    pub namespace: String,
    /// The agents' port (discovery).
    #[arg(long, default_value_t = 9443)]
    pub agent_port: u16,
    /// Where volumes go when a request names no pool.
    #[arg(long, default_value = "default")]
    pub default_pool: String,
    /// Where volumes go when a request names no node (default: the first agent).
    #[arg(long)]
    pub default_node: Option<String>,
    /// The name every agent's certificate carries (for one certificate shared by all nodes);
    /// by default each agent's certificate must name its node.
    #[arg(long)]
    pub agent_server_name: Option<String>,
    /// Run with replicas: only the holder of the Lease (in --namespace) relays node events to
    /// the claims. Every replica serves CSI.
    #[arg(long)]
    pub leader_elect: bool,
    /// The Lease's name.
    #[arg(long, default_value = "qsd-csi-controller")]
    pub lease_name: String,
    /// This replica's name in the Lease and in the Events it posts.
    #[arg(long, env = "POD_NAME", default_value_t = qsd_node::pool::id::host_node_name())]
    pub identity: String,
    #[command(flatten)]
    pub tls: TlsFileArgs,
    /// Sign the node agents' certificate requests (Kubernetes CSRs, signer
    /// qsd.csi.dev/node-agent) with this CA key, after checking each comes from a node plugin
    /// pod (--node-pod-selector) running on the node it names.
    #[arg(long, value_name = "FILE")]
    pub signing_ca_key: Option<PathBuf>,
    /// The signing CA's certificate (default: --tls-ca).
    #[arg(long, value_name = "FILE", requires = "signing_ca_key")]
    pub signing_ca_cert: Option<PathBuf>,
    /// The node plugin pods' service account (in --namespace): only it may ask for agent
    /// certificates.
    #[arg(long, value_name = "NAME", default_value = "qsd-csi-node")]
    pub node_service_account: String,
    /// The node plugin pods' labels, for the signer (default: the --discover-agents selector).
    #[arg(long, value_name = "SELECTOR")]
    pub node_pod_selector: Option<String>,
    #[command(flatten)]
    pub health: HealthArgs,
    /// Serve Prometheus metrics (GET /metrics, text format) here: every gRPC call,
    /// auto-expansions.
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<std::net::SocketAddr>,
}

#[derive(Debug, Subcommand)]
pub enum CertsCmd {
    /// Sign a node agent's certificate with the cluster CA, for nodes that cannot ask through
    /// Kubernetes: a new key, the node's name as CN and DNS name, server auth only. Writes
    /// OUT_DIR/NODE.crt and OUT_DIR/NODE.key (0600).
    SignNode {
        /// The node's name.
        #[arg(long)]
        node: String,
        /// The cluster CA's certificate (PEM).
        #[arg(long, value_name = "FILE")]
        ca_cert: PathBuf,
        /// The cluster CA's key (PEM).
        #[arg(long, value_name = "FILE")]
        ca_key: PathBuf,
        /// Validity in days.
        #[arg(long, default_value_t = 365)]
        days: u64,
        /// Where to write the certificate and key.
        #[arg(long, value_name = "DIR")]
        out_dir: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum PoolCmd {
    /// Check each pool's records against its images and chains: unreadable records, dangling
    /// references, loops, missing or damaged images, images and layers nothing uses, and
    /// interrupted record writes. Exits 0 when nothing is wrong, 2 when something is.
    Check {
        /// The pools: the same --state-dir and --pool settings as the driver's.
        #[command(flatten)]
        engine: EngineArgs,
        /// Remove what loses nothing: images no record names, layers nothing uses, and
        /// interrupted record writes (a shared pool's only after an hour unchanged). Never a
        /// volume's or snapshot's data, a record, a reference or a damaged image. Refused
        /// while any process holds the pool's images open (stop the driver first).
        #[arg(long)]
        repair: bool,
        /// Records and references only; do not open the images with qemu-img.
        #[arg(long)]
        records_only: bool,
        /// Output format: table (default) or json.
        #[arg(short = 'o', long = "output", value_enum, default_value_t)]
        output: Output,
    },
}
