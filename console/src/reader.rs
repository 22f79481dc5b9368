//! The read model as a processor of the stream runtime: each record, decoded by its topic,
//! is applied to the partition's staged store ([`crate::model`]); the runtime commits the
//! state with the input offsets in one atomic batch, so the read model is exactly as of
//! its last commit after a crash, each record applied once. New events go to the live
//! feed after the commit. Undecodable records are counted, logged with their offset and
//! skipped (the services that produce them set theirs aside on the poison topic).

use std::time::Duration;

use rdkafka::message::{Message, OwnedMessage};
use s2s_common::contract;
use s2s_common::topics::TopicsConfig;
use s2s_state::runtime::{Cx, Processor, RuntimeError};
use tokio::sync::broadcast;

use crate::model::{apply, Input, LiveEvent};
use crate::schema::Cf;

/// How long an idle reader waits for input before it looks again.
const IDLE: Duration = Duration::from_millis(500);

/// The kind of input each topic carries.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Click,
    Postback,
    Conversion,
    Rejection,
    Attempt,
    DeadLetter,
    Command,
    Refusal,
}

#[derive(Debug)]
pub struct Reader {
    topics: Vec<(String, Kind)>,
    feed: broadcast::Sender<LiveEvent>,
}

impl Reader {
    pub fn new(t: &TopicsConfig) -> Self {
        let topics = [
            (&t.clicks, Kind::Click),
            (&t.postbacks, Kind::Postback),
            (&t.conversions, Kind::Conversion),
            (&t.rejections, Kind::Rejection),
            (&t.delivery_log, Kind::Attempt),
            (&t.dead_letter, Kind::DeadLetter),
            (&t.delivery_commands, Kind::Command),
            (&t.refusals, Kind::Refusal),
        ]
        .into_iter()
        .map(|(t, k)| (t.name.clone(), k))
        .collect();
        Reader {
            topics,
            // Late subscribers miss what came before, slow ones skip ahead.
            feed: broadcast::channel(1024).0,
        }
    }

    /// The live feed: events of committed cycles.
    pub fn feed(&self) -> broadcast::Sender<LiveEvent> {
        self.feed.clone()
    }

    fn kind(&self, topic: &str) -> Kind {
        self.topics
            .iter()
            .find(|(t, _)| t == topic)
            .map_or(Kind::Command, |(_, k)| *k)
    }
}

/// Decodes a record of `kind`; the input or the decoding error.
fn decode(kind: Kind, raw: &[u8]) -> Result<Input<'_>, String> {
    fn as_input<'m, T: serde::de::DeserializeOwned + contract::Versioned>(
        raw: &'m [u8],
        wrap: fn(&'m [u8], Box<T>) -> Input<'m>,
    ) -> Result<Input<'m>, String> {
        contract::decode(raw)
            .map(|r| wrap(raw, Box::new(r)))
            .map_err(|e| e.to_string())
    }
    match kind {
        Kind::Click => as_input(raw, Input::Click),
        Kind::Postback => as_input(raw, Input::Postback),
        Kind::Conversion => as_input(raw, Input::Conversion),
        Kind::Rejection => as_input(raw, Input::Rejection),
        Kind::Attempt => as_input(raw, Input::Attempt),
        Kind::DeadLetter => as_input(raw, Input::DeadLetter),
        Kind::Command => as_input(raw, Input::Command),
        Kind::Refusal => as_input(raw, Input::Refusal),
    }
}

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Kind::Click => "click",
            Kind::Postback => "postback",
            Kind::Conversion => "conversion",
            Kind::Rejection => "rejection",
            Kind::Attempt => "attempt",
            Kind::DeadLetter => "dead_letter",
            Kind::Command => "command",
            Kind::Refusal => "refusal",
        }
    }
}

impl Processor<Cf> for Reader {
    type Event = LiveEvent;
    type Wake = ();

    fn process(
        &mut self,
        cx: &mut Cx<'_, '_, Cf, LiveEvent>,
        records: &[OwnedMessage],
    ) -> Result<(), RuntimeError> {
        for m in records {
            let kind = self.kind(m.topic());
            match decode(kind, m.payload().unwrap_or_default()) {
                Ok(input) => {
                    if let Some(e) = apply(cx.state, &input)? {
                        cx.event(e);
                    }
                }
                Err(reason) => cx.poison(m, kind.label(), reason),
            }
        }
        Ok(())
    }

    fn committed(&mut self, events: Vec<LiveEvent>) {
        for e in events {
            // Nobody listening is fine.
            let _ = self.feed.send(e);
        }
    }

    fn idle_wait(&self) -> Option<Duration> {
        Some(IDLE)
    }
}
