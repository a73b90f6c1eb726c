//! Lifecycle stages: the tenant's model, the distribution of profiles over it and each
//! profile's transitions.
//!
//! Guarantees: a model is validated whole before it replaces the old one (errors name the
//! offending value, such as `stages[1].condition.all[0].op`); after a change every profile's
//! stage is recomputed, with transitions recorded, before the mutation answers.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use domain::lifecycle::{LifecycleModel, StageInput};
use domain::Permission;
use serde_json::{json, Value};
use uuid::Uuid;

use super::auth::require_permission;
use super::{audit, understand, AppState, RequestMeta, ServiceError, ServiceResult};
use crate::auth::Principal;
use crate::store;

/// A stage as callers see it.
#[derive(Debug, Clone)]
pub struct Stage {
    pub key: String,
    pub name: String,
    pub condition: Value,
    pub position: usize,
}

fn stages_of(model: &LifecycleModel) -> Vec<Stage> {
    model
        .stages()
        .iter()
        .enumerate()
        .map(|(position, stage)| Stage {
            key: stage.key.clone(),
            name: stage.name.clone(),
            condition: stage.condition.to_json(),
            position,
        })
        .collect()
}

/// The tenant's model (the default one until it sets its own).
pub async fn model(state: &AppState, principal: Option<&Principal>) -> ServiceResult<Vec<Stage>> {
    let principal = require_permission(principal, Permission::ProfilesRead)?;
    let tx = state.store.read(principal.tenant_id).await?;
    Ok(stages_of(
        &understand::lifecycle_model_as_written(&tx).await?,
    ))
}

/// Replaces the model and recomputes every profile's stage.
pub async fn set_model(
    state: &AppState,
    principal: Option<&Principal>,
    meta: &RequestMeta,
    inputs: Vec<StageInput>,
) -> ServiceResult<Vec<Stage>> {
    let principal = require_permission(principal, Permission::SegmentsManage)?;
    let model = LifecycleModel::new(&inputs)
        .map_err(|error| ServiceError::bad_input(error.field, error.reason))?;
    let tx = state.store.begin(principal.tenant_id).await?;
    let blinder = super::privacy::blinder(state, &tx).await?;
    let mut rows: Vec<(String, String, Value, Value)> = Vec::new();
    for (index, stage) in model.stages().iter().enumerate() {
        let evaluated = blinder.condition(&stage.condition).map_err(|error| {
            ServiceError::bad_input(format!("stages[{index}].{}", error.path), error.reason)
        })?;
        rows.push((
            stage.key.clone(),
            stage.name.clone(),
            stage.condition.to_json(),
            evaluated.to_json(),
        ));
    }
    store::lifecycle::replace_model(&tx, &rows).await?;
    audit::record(
        state,
        &tx,
        meta,
        &principal.actor(),
        "lifecycle.set_model",
        None,
        Some(json!({"stages": rows.iter().map(|(key, _, _, _)| key).collect::<Vec<_>>()})),
    )
    .await?;
    tx.commit().await?;
    let notices = understand::restage(
        &state.store,
        principal.tenant_id,
        state.now(),
        state.config.scheduler_batch,
        "lifecycle model changed",
    )
    .await?;
    state.bus.publish(notices);
    Ok(stages_of(&model))
}

/// How many live profiles are in each stage, in model order; profiles without a stage are
/// counted under the empty key when there are any.
pub async fn distribution(
    state: &AppState,
    principal: Option<&Principal>,
) -> ServiceResult<Vec<(String, u64)>> {
    let principal = require_permission(principal, Permission::ProfilesRead)?;
    let tx = state.store.read(principal.tenant_id).await?;
    let model = understand::lifecycle_model(&tx).await?;
    let counts = store::lifecycle::distribution(&tx).await?;
    let count_of = |key: Option<&str>| {
        counts
            .iter()
            .filter(|(stage, _)| stage.as_deref() == key)
            .map(|(_, count)| u64::try_from(*count).unwrap_or(0))
            .sum::<u64>()
    };
    let mut out: Vec<(String, u64)> = model
        .stages()
        .iter()
        .map(|stage| (stage.key.clone(), count_of(Some(&stage.key))))
        .collect();
    // Stages of an earlier model that some profile still shows (until the recomputation ends).
    for (stage, count) in &counts {
        if let Some(stage) = stage {
            if model.position(stage).is_none() {
                out.push((stage.clone(), u64::try_from(*count).unwrap_or(0)));
            }
        }
    }
    let none = count_of(None);
    if none > 0 {
        out.push((String::new(), none));
    }
    Ok(out)
}

/// One recorded change of stage.
#[derive(Debug, Clone)]
pub struct Transition {
    pub profile_id: Uuid,
    pub from: Option<String>,
    pub to: String,
    pub at: DateTime<Utc>,
    pub reason: String,
}

/// A profile's transitions, newest first.
pub async fn transitions(
    state: &AppState,
    principal: Option<&Principal>,
    profile_id: Uuid,
    limit: u64,
) -> ServiceResult<Vec<Transition>> {
    let principal = require_permission(principal, Permission::ProfilesRead)?;
    let tx = state.store.read(principal.tenant_id).await?;
    Ok(store::lifecycle::transitions_of(&tx, profile_id, limit)
        .await?
        .into_iter()
        .map(|row| Transition {
            profile_id: row.profile_id,
            from: row.from_stage,
            to: row.to_stage,
            at: row.at,
            reason: row.reason,
        })
        .collect())
}

/// A profile's current stage.
/// The current stage of each of `profile_ids` that has one, in one read.
pub async fn current_stages(
    state: &AppState,
    principal: Option<&Principal>,
    profile_ids: &[Uuid],
) -> ServiceResult<HashMap<Uuid, String>> {
    let principal = require_permission(principal, Permission::ProfilesRead)?;
    let tx = state.store.read(principal.tenant_id).await?;
    Ok(store::lifecycle::states_of(&tx, profile_ids)
        .await?
        .into_iter()
        .filter_map(|row| Some((row.id, row.stage?)))
        .collect())
}
