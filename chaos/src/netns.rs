//! Network namespaces for cluster tests (root only, iproute2): one namespace per node, joined by
//! a bridge in the test's namespace, so the test reaches every node and can cut the links between
//! nodes with blackhole routes while clients still reach both sides. Removed when dropped.

use std::net::Ipv4Addr;
use std::process::Command;

use anyhow::{Result, bail};

/// A bridge `mbr{n}` with address 10.79.{n}.1 and namespaces `mer{n}-{id}` at 10.79.{n}.{10+id}.
pub struct Netns {
    n: u8,
    nodes: Vec<u64>,
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip").args(args).output()?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

impl Netns {
    /// Creates namespaces for nodes `1..=size` (replacing leftovers of a crashed run).
    pub fn create(size: usize) -> Result<Self> {
        let n = (std::process::id() % 200) as u8 + 20;
        let net = Self {
            n,
            nodes: (1..=size as u64).collect(),
        };
        net.teardown();
        let bridge = net.bridge();
        ip(&["link", "add", "name", &bridge, "type", "bridge"])?;
        ip(&["link", "set", &bridge, "up"])?;
        ip(&["addr", "add", &format!("10.79.{n}.1/24"), "dev", &bridge])?;
        for id in &net.nodes {
            let ns = net.ns(*id);
            let veth = format!("mv{n}-{id}");
            ip(&["netns", "add", &ns])?;
            ip(&[
                "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns,
            ])?;
            ip(&["link", "set", &veth, "master", &bridge, "up"])?;
            let addr = format!("{}/24", net.ip(*id));
            ip(&[
                "netns", "exec", &ns, "ip", "addr", "add", &addr, "dev", "eth0",
            ])?;
            ip(&["netns", "exec", &ns, "ip", "link", "set", "eth0", "up"])?;
            ip(&["netns", "exec", &ns, "ip", "link", "set", "lo", "up"])?;
        }
        Ok(net)
    }

    fn bridge(&self) -> String {
        format!("mbr{}", self.n)
    }

    /// Namespace of node `id`.
    pub fn ns(&self, id: u64) -> String {
        format!("mer{}-{id}", self.n)
    }

    /// Address of node `id`.
    pub fn ip(&self, id: u64) -> Ipv4Addr {
        Ipv4Addr::new(10, 79, self.n, 10 + id as u8)
    }

    /// Cuts the link between nodes `a` and `b` (both directions); clients still reach both.
    pub fn cut(&self, a: u64, b: u64) -> Result<()> {
        ip(&[
            "netns",
            "exec",
            &self.ns(a),
            "ip",
            "route",
            "add",
            "blackhole",
            &format!("{}/32", self.ip(b)),
        ])?;
        ip(&[
            "netns",
            "exec",
            &self.ns(b),
            "ip",
            "route",
            "add",
            "blackhole",
            &format!("{}/32", self.ip(a)),
        ])
    }

    /// Restores the link between `a` and `b`.
    pub fn heal(&self, a: u64, b: u64) -> Result<()> {
        ip(&[
            "netns",
            "exec",
            &self.ns(a),
            "ip",
            "route",
            "del",
            "blackhole",
            &format!("{}/32", self.ip(b)),
        ])?;
        ip(&[
            "netns",
            "exec",
            &self.ns(b),
            "ip",
            "route",
            "del",
            "blackhole",
            &format!("{}/32", self.ip(a)),
        ])
    }

    /// Cuts `node` off from every other node.
    pub fn isolate(&self, node: u64) -> Result<()> {
        for other in self.nodes.iter().filter(|o| **o != node) {
            self.cut(node, *other)?;
        }
        Ok(())
    }

    /// Reconnects `node` to every other node.
    pub fn rejoin(&self, node: u64) -> Result<()> {
        for other in self.nodes.iter().filter(|o| **o != node) {
            self.heal(node, *other)?;
        }
        Ok(())
    }

    fn teardown(&self) {
        for id in &self.nodes {
            let _ = ip(&["netns", "del", &self.ns(*id)]);
        }
        let _ = ip(&["link", "del", &self.bridge()]);
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        self.teardown();
    }
}
