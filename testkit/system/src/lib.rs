//! simq's whole-system tests live in `tests/`: each deploys the stack on the real local
//! Consul and Nomad that `scripts/test.sh` starts (the harness: `tests/common/mod.rs`:
//! deploy, indexer CLI, queries, bounded unique-query load, faults) and checks one
//! behaviour end to end. They are `#[ignore]`d in plain `cargo test`. This library is
//! empty: the crate exists to hold them apart from any one component.
