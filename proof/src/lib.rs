//! Proof that the pipeline keeps its promises across process boundaries: a load generator
//! that drives a realistic mix through ingest's HTTP API and records what it sent
//! ([`plan`], [`load`]), a recording affiliate endpoint ([`endpoint`]), and a verifier
//! that reads every output topic and what the endpoints received and checks each
//! postback's outcome and each conversion's deliveries ([`verify`]). The chaos tests
//! (`tests/tests/chaos.rs`) and the end-to-end benchmark use them; `s2s-proof` runs them
//! against a live pipeline.

pub mod endpoint;
pub mod load;
pub mod plan;
pub mod verify;
