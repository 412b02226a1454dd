//! Provenance of an artifact: which guest and host it was found on.

use serde::{Deserialize, Serialize};

/// Provenance of an artifact: replay warns when the guest or the host differs.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Origin {
    /// [`GuestImage::hash`] of the guest it was found with, in hex.
    pub guest_hash: String,
    /// The host profile's one-line summary.
    pub host_profile: String,
}
