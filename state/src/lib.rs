//! The stream runtime of the pipeline's stateful services (the attributor's join,
//! delivery's schedule, the console's read model), the Kafka Streams way without the JVM:
//! one RocksDB store per input partition ([`store`]), its changes logged to a compacted
//! changelog topic (partition N for input partition N), partition ownership that opens,
//! restores and positions a partition's store when the consumer group assigns it
//! ([`ownership`]), and the [`runtime`] that drives a service's
//! [`Processor`](runtime::Processor) through cycles committed with their input offsets.
//!
//! The store is the source of truth for a partition's input offsets: they are committed in
//! the same atomic write batch as the state they produced, so after a crash the store is
//! exactly as of its last commit and no restore is needed; the changelog only serves a
//! partition that moves to another instance, or a lost disk.

pub mod input;
pub mod memory;
pub mod metrics;
pub mod ownership;
pub mod reach;
pub mod runtime;
pub mod store;

pub use input::Positions;
pub use metrics::RuntimeMetrics;
pub use ownership::{Changelog, Ownership, OwnershipContext};
pub use runtime::{Guarantee, Runtime, RuntimeError};
pub use store::{
    changelog_key, expired, stamp, stamped, unstamped, Entries, Family, Limits, RocksConfig,
    Staged, Store, StoreError, StoreSet,
};
