//! The names simq's services register in Consul, and the tags that tie an instance to a
//! dg, a shard or a model. The job specs (`nomad/*.nomad.hcl`) register them, the
//! balancer and the indexer look them up; `nomad/tests/job_specs.rs` checks that the
//! specs use these names.

/// The public entry (one per node).
pub const BALANCER: &str = "simq-balancer";
/// The embedding service.
pub const EMBEDDER: &str = "simq-embedder";
/// One shard of one dg.
pub const SHARD: &str = "simq-shard";
/// Every simq service, in the order the status lists them.
pub const ALL: [&str; 3] = [BALANCER, EMBEDDER, SHARD];

/// Tag names, each carried as `name=value`.
pub mod tag {
    /// The dg a shard instance serves (`dg=dg-…`).
    pub const DG: &str = "dg";
    /// The shard number within its dg (`shard=0`).
    pub const SHARD: &str = "shard";
    /// The content address of the shard file (`sha256=…`): a shard of another dg with
    /// the same file may serve this one.
    pub const SHA256: &str = "sha256";
    /// The model an embedder runs (`model=…`).
    pub const MODEL: &str = "model";
}

/// The value of the `name=value` tag `name`, if the instance carries it.
pub fn tag_value<'a>(tags: &'a [String], name: &str) -> Option<&'a str> {
    tags.iter().find_map(|t| value_of(t, name))
}

/// The value of `tag` when it is a `name=value` tag of `name`.
pub fn value_of<'a>(tag: &'a str, name: &str) -> Option<&'a str> {
    tag.strip_prefix(name)?.strip_prefix('=')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tag_values_need_the_exact_name() {
        let tags: Vec<String> = ["dg=dg-1", "dgx=2", "shard=3", "model"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(tag_value(&tags, tag::DG), Some("dg-1"));
        assert_eq!(tag_value(&tags, tag::SHARD), Some("3"));
        assert_eq!(tag_value(&tags, tag::MODEL), None);
    }
}
