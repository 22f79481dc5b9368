//! The cross-service integration tests, in one binary: one link of RocksDB, librdkafka
//! and the services instead of one per area. Each module is an area; run one with a name
//! filter, e.g. `cargo test --workspace --test it -- chaos::` (with a broker in
//! `S2S_TEST_BROKERS`, as `scripts/test` provides). What each covers, and on which broker:
//! `tests/README.md`.

mod attributor;
mod attributor_faults;

mod broker_probe;
mod catalog;
mod catalog_fencing;
mod catalog_page;
mod chaos;
mod console;
mod data_teams;
mod delivery;
mod deploy;
mod e2e;
mod ingest;
mod ingest_faults;
mod k8s;
mod openapi;
mod postbacks;
mod secrets;
