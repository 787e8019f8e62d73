//! The FHIRcast STU3 hub (WebSocket channel) of `atlas serve`.
//! (Filled in by issue 21, part 4.)

use std::sync::Arc;

use serde::Deserialize;
use utoipa_axum::router::OpenApiRouter;

use crate::{AppState, ServeConfig};
use atlas_lake::Lake;

/// `[fhircast]` settings.
#[derive(Debug, Clone, PartialEq, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct FhircastConfig {}

/// The hub's state shared by every handler.
pub struct HubState {}

impl HubState {
    pub(crate) async fn open(_lake: &Lake, _config: &ServeConfig) -> Result<Arc<HubState>, String> {
        Ok(Arc::new(HubState {}))
    }
}

pub(crate) fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
}
