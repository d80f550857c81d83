//! The index layout and search defaults, in one place: the indexer's and the balancer's
//! flags default to these, and the scripts and job specs read them from
//! `simq-indexer defaults` instead of repeating the numbers.

/// Shards of a dg (k-means k): one process each. On 2 cores fewer shards mean fewer
/// gRPC calls per query (2 against 4 and 8: indexer/BENCH.md "How many shards").
pub const SHARDS: usize = 2;

/// Fine clusters over all shards: about 39 items each on the 158k-query corpus; 4096 gave
/// the most recall per item read (indexer/BENCH.md).
pub const CLUSTERS: usize = 4096;

/// Fine clusters a query probes: with [`CLUSTERS`] over the 158k-query corpus, 576 read
/// about 15 % of it for recall@10 0.982 against exact search (192: 5 %, 0.950;
/// indexer/BENCH.md).
pub const NPROBE: usize = 576;

/// The defaults as `name=value` lines, as `simq-indexer defaults` prints them for scripts.
pub fn as_lines() -> String {
    format!("shards={SHARDS}\nclusters={CLUSTERS}\nnprobe={NPROBE}\n")
}
