//! Shared access policies and their permissions.

use serde::{Deserialize, Serialize};

/// A permission a shared access policy grants (Azure's names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Permission {
    /// Read the identity registry.
    RegistryRead,
    /// Write the identity registry; implies [`Permission::RegistryRead`].
    RegistryWrite,
    /// Service-facing endpoints: twins, direct methods, C2D, queries, jobs.
    ServiceConnect,
    /// Device-facing endpoints on behalf of any device.
    DeviceConnect,
}

/// A named hub-level credential with two keys and a set of permissions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SharedAccessPolicy {
    /// The policy name, carried as `skn` in SAS tokens.
    pub key_name: String,
    /// Base64 primary key.
    pub primary_key: String,
    /// Base64 secondary key.
    pub secondary_key: String,
    /// What the policy may do.
    pub rights: Vec<Permission>,
}

impl SharedAccessPolicy {
    /// Whether this policy grants `needed` (RegistryWrite implies RegistryRead).
    pub fn grants(&self, needed: Permission) -> bool {
        self.rights.iter().any(|r| {
            *r == needed || (needed == Permission::RegistryRead && *r == Permission::RegistryWrite)
        })
    }

    /// The five policies every hub starts with, using the given key pairs in order.
    pub fn defaults(keys: [(String, String); 5]) -> Vec<SharedAccessPolicy> {
        use Permission::*;
        let specs: [(&str, Vec<Permission>); 5] = [
            (
                "iothubowner",
                vec![RegistryRead, RegistryWrite, ServiceConnect, DeviceConnect],
            ),
            ("service", vec![ServiceConnect]),
            ("device", vec![DeviceConnect]),
            ("registryRead", vec![RegistryRead]),
            ("registryReadWrite", vec![RegistryRead, RegistryWrite]),
        ];
        specs
            .into_iter()
            .zip(keys)
            .map(
                |((name, rights), (primary, secondary))| SharedAccessPolicy {
                    key_name: name.to_string(),
                    primary_key: primary,
                    secondary_key: secondary,
                    rights,
                },
            )
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_implies_read_but_not_service() {
        let keys = std::array::from_fn(|i| (format!("p{i}"), format!("s{i}")));
        let policies = SharedAccessPolicy::defaults(keys);
        let rw = policies
            .iter()
            .find(|p| p.key_name == "registryReadWrite")
            .expect("default policy");
        assert!(rw.grants(Permission::RegistryRead));
        assert!(rw.grants(Permission::RegistryWrite));
        assert!(!rw.grants(Permission::ServiceConnect));
        let read = policies
            .iter()
            .find(|p| p.key_name == "registryRead")
            .expect("default policy");
        assert!(!read.grants(Permission::RegistryWrite));
        let owner = &policies[0];
        for p in [
            Permission::RegistryRead,
            Permission::RegistryWrite,
            Permission::ServiceConnect,
            Permission::DeviceConnect,
        ] {
            assert!(owner.grants(p));
        }
    }
}
