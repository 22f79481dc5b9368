//! The control plane's catalog, the Kafka Connect / Schema Registry way: one compacted
//! topic with one partition is the store of record for every catalog entity (offers,
//! affiliates, postbacks, sources, operators), keyed `<kind>/<id>`, the value the entity's
//! whole current document, a tombstone for a deleted one.
//!
//! - [`Catalog`]: the materialized catalog and the one rule of change — a change names
//!   the revision it was made against, and is accepted only if that is still the
//!   entity's revision (a pure core, unit-tested).
//! - [`Follower`]: reads the topic from its start to its end before it reports ready
//!   (the end as the fetch answers it, never ListOffsets), then follows it live,
//!   publishing each new catalog.
//! - [`Writer`]: checks a change against the followed catalog, appends it, appends its
//!   audit record, and returns once the follower has applied it.
//!
//! - [`History`]: every accepted change by entity, from the audit topic (a second
//!   [`Follower`]).
//! - [`documents`]: what each kind's document must be, checked before a change.
//! - [`Election`]: which instance writes, through a consumer group (one writer at a
//!   time: the topic's one partition goes to one member).
//! - [`Live`]: a service's own compiled view of the catalog, replaced at each change.
//! - [`file`]: the import and export format, and an import's plan.
//! - [`secrets`]: secret fields, write-only through the API and sealed in the topic.
//!
//! An entity's revision is the offset of its record in the catalog topic: unique,
//! increasing, kept by compaction, and never reused after a delete (a stale `If-Match`
//! from before a delete and re-create cannot match).

pub mod catalog;
pub mod documents;
pub mod election;
pub mod file;
pub mod follower;
pub mod history;
pub mod record;
pub mod secrets;
pub mod view;
pub mod writer;

pub use catalog::{Announcement, Catalog, Conflict, WRITER_KEY};
pub use election::{Election, ElectionError};
pub use follower::{Follower, FollowerError, Materialized};
pub use history::History;
pub use record::{AuditRecord, Change, Entry, Key, KeyError, Kind, Stored};
pub use view::{Live, LiveError};
pub use writer::{WriteError, Writer, Written};
