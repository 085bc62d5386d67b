//! The hub domain: identity registry, twins and access policies as plain data, changed only by
//! [`HubState::apply`]. Pure code: no runtime, no clock, no I/O. Everything non-deterministic (the
//! time, generated keys) is chosen by the node that proposes a command and travels inside it, so
//! every replica computes the same state and the same response.

pub mod c2d;
pub mod command;
pub mod error;
pub mod events;
pub mod ids;
pub mod policy;
pub mod region;
pub mod registry;
pub mod routing;
pub mod state;
pub mod telemetry;
pub mod twin;

pub use command::{HubCommand, HubResponse, IfMatch};
pub use error::{HubError, HubResult};
pub use ids::{DeviceId, ModuleId};
pub use policy::{Permission, SharedAccessPolicy};
pub use state::HubState;
