//! Re-fire: one dead-lettered or failed delivery, or every dead letter of an endpoint in a
//! time range. Nothing is sent from here: a `redeliver` command per delivery goes to the
//! delivery-commands topic, keyed by click ID, and the answer waits for the broker's
//! acknowledgement of each; the delivery instance that owns the delivery sends it again
//! with its stable `webhook-id`.

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use s2s_catalog::documents::Role;
use s2s_common::contract::{CommandAction, DeliveryCommand};
use s2s_common::kafka::{produce_all, OutRecord};
use s2s_common::topics::partition_key;
use serde::Deserialize;

use super::{read, ApiError, Operator, Shared, MAX_BULK};
use crate::query::Window;
use crate::schema::DeliveryState;

#[derive(Debug, Default, Deserialize)]
pub(super) struct RefireBody {
    reason: Option<String>,
}

/// Publishes the redeliver commands and waits for the broker's acknowledgement of each.
async fn send_commands(s: &Shared, commands: &[DeliveryCommand]) -> Result<(), ApiError> {
    let out: Vec<OutRecord<'_>> = commands
        .iter()
        .map(|c| OutRecord::record(&s.commands_topic, partition_key(&c.conversion.click_id), c))
        .collect();
    produce_all(&s.producer, &out).await.map_err(|e| {
        tracing::error!(error = %e, "publishing re-fire commands failed");
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "the broker did not acknowledge every command (unavailable); try again: a \
             delivery re-fired twice is sent with the same webhook-id, and never after it \
             was delivered",
        )
    })?;
    Ok(())
}

fn command(
    conversion: s2s_common::contract::Conversion,
    endpoint: String,
    who: &Operator,
    reason: Option<String>,
) -> DeliveryCommand {
    DeliveryCommand::new(
        CommandAction::Redeliver,
        endpoint,
        conversion,
        who.name.clone(),
        s2s_common::now_ms(),
        reason,
    )
}

pub(super) async fn refire_one(
    State(s): State<Shared>,
    axum::Extension(who): axum::Extension<Operator>,
    Path(id): Path<String>,
    body: Option<Json<RefireBody>>,
) -> Result<Response, ApiError> {
    who.may(Role::Operator, "re-firing a delivery")?;
    let key = id.clone();
    let Some((conversion, row)) = read(&s, move |r| r.refire_source(&key)).await? else {
        s.metrics.refires.with_label_values(&["not_found"]).inc();
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no delivery {id}"),
        ));
    };
    if row.state == DeliveryState::Delivered {
        s.metrics
            .refires
            .with_label_values(&["already_delivered"])
            .inc();
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "already_delivered",
            "this delivery succeeded; it is not sent again",
        ));
    }
    let reason = body.and_then(|b| b.0.reason);
    let cmd = command(conversion, row.endpoint.clone(), &who, reason);
    send_commands(&s, std::slice::from_ref(&cmd)).await?;
    s.metrics.refires.with_label_values(&["sent"]).inc();
    tracing::info!(operator = %who.name, delivery_id = %id, command_id = %cmd.command_id, "re-fire requested");
    Ok((
        StatusCode::ACCEPTED,
        Json(serde_json::json!({"command_id": cmd.command_id, "delivery_id": id, "requested_by": who.name})),
    )
        .into_response())
}

#[derive(Debug, Deserialize)]
pub(super) struct BulkRefire {
    endpoint: String,
    from: Option<i64>,
    to: Option<i64>,
    reason: Option<String>,
}

pub(super) async fn refire_many(
    State(s): State<Shared>,
    axum::Extension(who): axum::Extension<Operator>,
    body: Result<Json<BulkRefire>, JsonRejection>,
) -> Result<Response, ApiError> {
    who.may(Role::Operator, "re-firing deliveries")?;
    let Json(b) = body?;
    let (endpoint, from, to) = (b.endpoint.clone(), b.from, b.to);
    let sources = read(&s, move |r| {
        let mut out = Vec::new();
        let mut window = Window {
            from,
            to,
            cursor: None,
            limit: Some(500),
        };
        loop {
            let page = r.dead_letters(Some(&endpoint), &window)?;
            for row in page.items {
                if let Some(src) = r.refire_source(&row.delivery_id)? {
                    out.push(src);
                }
            }
            match page.next_cursor {
                Some(c) if out.len() < MAX_BULK => window.cursor = Some(c),
                Some(_) => return Ok((out, true)),
                None => break,
            }
        }
        let more = out.len() > MAX_BULK;
        out.truncate(MAX_BULK);
        Ok((out, more))
    })
    .await?;
    let (sources, more) = sources;
    let commands: Vec<DeliveryCommand> = sources
        .into_iter()
        .map(|(c, row)| command(c, row.endpoint, &who, b.reason.clone()))
        .collect();
    send_commands(&s, &commands).await?;
    s.metrics
        .refires
        .with_label_values(&["sent"])
        .inc_by(commands.len() as u64);
    tracing::info!(operator = %who.name, endpoint = %b.endpoint, count = commands.len(), "bulk re-fire requested");
    Ok((
        StatusCode::ACCEPTED,
        Json(serde_json::json!({
            "sent": commands.len(),
            "requested_by": who.name,
            // More matched than one request re-fires: ask again once these are settled.
            "more": more,
            "delivery_ids": commands.iter().take(20).map(|c| c.conversion.delivery_id(&c.endpoint)).collect::<Vec<_>>(),
        })),
    )
        .into_response())
}
