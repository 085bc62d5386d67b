//! The region record of a geo-paired hub, replicated in each region's own hub group: the fencing
//! epoch (which region is primary), how far this region has copied the primary's hub log, and the
//! failover history. Pure: what a region may apply is decided here, from the command and the
//! record, so every replica of a region decides the same (docs/adr/009-regions.md).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::command::HubCommand;
use super::error::HubError;
use meridian_failover::RegionEpoch;
use meridian_proto::ErrorCode;

/// One failover or failback, as recorded by the region that took part.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FailoverRecord {
    /// The epoch it established.
    pub epoch: u64,
    /// The new primary region.
    pub primary: String,
    /// `manual`, `forced`, `automatic`, `initial` or `learned` (heard from another region).
    pub kind: String,
    /// Unix seconds.
    pub at_unix_secs: u64,
}

/// The region state of one region's hub group.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RegionRecord {
    /// The fencing epoch: number 0 until the hub's regions are set up (or in a one-region hub).
    pub epoch: RegionEpoch,
    /// Highest index of the primary's hub log this region has applied (secondary regions).
    pub shipped_index: Option<u64>,
    /// Per partition, per stream key: this region's ends when it was last promoted. A returning
    /// old primary cuts its partitions back to them.
    pub promoted_ends: BTreeMap<u32, BTreeMap<u32, u64>>,
    /// The epoch at which `promoted_ends` were recorded (0: never promoted).
    #[serde(default)]
    pub promoted_epoch: u64,
    /// Failovers this region took part in, oldest first (at most 100).
    pub history: Vec<FailoverRecord>,
}

impl RegionRecord {
    /// Applies a new epoch. An older one is refused; the same one again changes nothing.
    pub fn set_epoch(
        &mut self,
        epoch: RegionEpoch,
        kind: &str,
        at_unix_secs: u64,
        reset_shipping: bool,
        promoted_ends: Option<BTreeMap<u32, BTreeMap<u32, u64>>>,
    ) -> Result<bool, HubError> {
        if epoch.number < self.epoch.number
            || (epoch.number == self.epoch.number && epoch.primary != self.epoch.primary)
        {
            return Err(HubError::new(
                ErrorCode::PreconditionFailed,
                format!(
                    "epoch {} (primary {}) is older than the current epoch {} (primary {})",
                    epoch.number, epoch.primary, self.epoch.number, self.epoch.primary
                ),
            ));
        }
        if epoch == self.epoch {
            return Ok(false);
        }
        self.history.push(FailoverRecord {
            epoch: epoch.number,
            primary: epoch.primary.clone(),
            kind: kind.to_string(),
            at_unix_secs,
        });
        if self.history.len() > 100 {
            self.history.remove(0);
        }
        self.epoch = epoch;
        if reset_shipping {
            self.shipped_index = None;
        }
        if let Some(ends) = promoted_ends {
            self.promoted_ends = ends;
            self.promoted_epoch = self.epoch.number;
        }
        Ok(true)
    }

    /// Failover times (Unix seconds) of the failovers and failbacks of the hub, for the caps.
    pub fn failover_times(&self) -> Vec<u64> {
        self.history
            .iter()
            .filter(|r| r.kind != "initial" && r.kind != "learned")
            .map(|r| r.at_unix_secs)
            .collect()
    }
}

/// Whether the hub group of `my_region` may apply `command` now. `my_region` is `None` in a
/// one-region hub, where everything is admitted.
///
/// In a geo-paired hub, client commands apply only in the primary region (a write that reached a
/// just-demoted primary's log after its demotion entry is refused, never acknowledged), and
/// copies of the primary's log only in the others.
pub fn admits(
    record: &RegionRecord,
    my_region: Option<&str>,
    command: &HubCommand,
) -> Result<(), HubError> {
    let Some(mine) = my_region else {
        return Ok(());
    };
    let primary = record.epoch.primary == mine;
    match command {
        HubCommand::SetRegionEpoch { .. } | HubCommand::SetNodeDraining { .. } => Ok(()),
        HubCommand::ApplyShipped { .. }
        | HubCommand::InstallShippedState { .. }
        | HubCommand::InstallShippedDevices { .. }
            if primary =>
        {
            Err(HubError::new(
                ErrorCode::PreconditionFailed,
                "this region is primary: it takes no copy of another region's log",
            ))
        }
        HubCommand::ApplyShipped { .. }
        | HubCommand::InstallShippedState { .. }
        | HubCommand::InstallShippedDevices { .. } => Ok(()),
        _ if primary => Ok(()),
        _ => Err(not_primary(record)),
    }
}

/// The error a non-primary region answers writes with (503: the SDKs and clients retry, and by
/// then their connection reaches the primary).
pub fn not_primary(record: &RegionRecord) -> HubError {
    HubError::new(
        ErrorCode::ServiceUnavailable,
        format!(
            "this region is not the hub's primary (primary region '{}', epoch {}); retry against the primary",
            record.epoch.primary, record.epoch.number
        ),
    )
}

/// Whether a shipped command is applied in a copy (cluster-local commands are not: drains name
/// the source region's nodes; the source's region record is its own).
pub fn shipped_applies(command: &HubCommand) -> bool {
    !matches!(
        command,
        HubCommand::SetNodeDraining { .. }
            | HubCommand::SetRegionEpoch { .. }
            | HubCommand::ApplyShipped { .. }
            | HubCommand::InstallShippedState { .. }
            | HubCommand::InstallShippedDevices { .. }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(n: u64, p: &str) -> RegionEpoch {
        RegionEpoch {
            number: n,
            primary: p.into(),
        }
    }

    #[test]
    fn epochs_only_move_forward() {
        let mut r = RegionRecord::default();
        assert_eq!(r.set_epoch(e(1, "a"), "initial", 10, false, None), Ok(true));
        assert_eq!(
            r.set_epoch(e(1, "a"), "initial", 11, false, None),
            Ok(false)
        );
        assert!(r.set_epoch(e(1, "b"), "manual", 12, false, None).is_err());
        r.shipped_index = Some(40);
        assert_eq!(r.set_epoch(e(2, "b"), "manual", 13, true, None), Ok(true));
        assert_eq!(r.shipped_index, None);
        assert!(r.set_epoch(e(1, "a"), "learned", 14, false, None).is_err());
        assert_eq!(r.failover_times(), vec![13]);
    }

    #[test]
    fn only_the_primary_takes_client_commands_and_only_others_take_copies() {
        let mut r = RegionRecord::default();
        let put = HubCommand::SetFallbackRoute { enabled: true };
        let ship = HubCommand::ApplyShipped {
            entries: vec![],
            through_index: 3,
            local_members: BTreeMap::new(),
        };
        assert!(admits(&r, None, &put).is_ok());
        assert!(admits(&r, Some("a"), &put).is_err(), "epoch 0: nobody");
        r.set_epoch(e(1, "a"), "initial", 0, false, None).ok();
        assert!(admits(&r, Some("a"), &put).is_ok());
        assert!(admits(&r, Some("a"), &ship).is_err());
        assert_eq!(
            admits(&r, Some("b"), &put).map_err(|e| e.code),
            Err(ErrorCode::ServiceUnavailable)
        );
        assert!(admits(&r, Some("b"), &ship).is_ok());
    }
}
