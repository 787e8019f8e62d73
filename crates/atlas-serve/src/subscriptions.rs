//! FHIR Subscriptions (R4 backport IG, topic-based, rest-hook) of `atlas serve`.
//! (Filled in by issue 21, part 5.)

use std::sync::Arc;

use serde::Deserialize;
use utoipa_axum::router::OpenApiRouter;

use crate::{AppState, ServeConfig};
use atlas_lake::Lake;

/// `[subscriptions]` settings.
#[derive(Debug, Clone, PartialEq, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct SubscriptionsConfig {}

/// Subscriptions, topics and their delivery.
pub struct SubscriptionState {}

impl SubscriptionState {
    pub(crate) async fn open(_lake: &Lake, _config: &ServeConfig) -> Result<Arc<SubscriptionState>, String> {
        Ok(Arc::new(SubscriptionState {}))
    }
}

pub(crate) fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
}
