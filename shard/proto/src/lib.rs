//! The shard's gRPC contract (`shard.proto`, package `simq.shard.v1`): the search and
//! lexical requests, their answers, the client and the server traits. A crate of its own
//! so that callers (the balancer) take the contract without the shard's LMDB and arroy.

tonic::include_proto!("simq.shard.v1");
