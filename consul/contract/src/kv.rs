//! simq's KV contract: the index generation manifest, the active pointer, and where both
//! live in Consul (prefix configurable, default `simq/`).
//!
//! - `<prefix>dg/<dg>/manifest`: a [`Manifest`] as JSON (kept under Consul's 512 KB cap).
//! - `<prefix>dg/<dg>/centroids/<i>`: the dg's cluster centroids as raw little-endian f32,
//!   cut into values under the cap; the manifest pins their sha256 (see [`crate::routing`]).
//! - `<prefix>active`: an [`ActiveDg`] as JSON, only ever written by check-and-set.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The content address of a file: its hex sha256, streamed. Blob names, shard checksums
/// and model file pins are all this.
pub fn sha256_file(path: &std::path::Path) -> std::io::Result<String> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// Version of the manifest layout. 2: fine clusters ([`ClusterTable`]) replace one
/// centroid per shard. 3: the dg id hashes the manifest's canonical JSON
/// ([`canonical_json`]), so it no longer depends on how this struct serialises.
pub const MANIFEST_FORMAT: u32 = 3;

/// Manifest formats this build reads: a newer simq opens the dgs an older one published
/// (`testdata/format-2/` and `testdata/format-3/` are kept as written and must keep their
/// dg ids). Format 2's id hashes this struct's own serialisation (members in declaration
/// order), so for format 2 never rename, reorder or remove a field. From format 3 on the
/// id hashes canonical JSON: member order and absent optional members (null) do not
/// count, so a new optional field leaves the ids of manifests without it unchanged. A
/// reader refuses members it does not know (they would be dropped from the hash).
pub const READABLE_MANIFEST_FORMATS: std::ops::RangeInclusive<u32> = 2..=MANIFEST_FORMAT;

/// The canonical bytes of a JSON value, what content addresses hash: object members
/// sorted by key (bytewise), members whose value is null left out, arrays in order, no
/// whitespace, strings and numbers as serde_json writes them. Two values that differ only
/// in member order, whitespace or null members have the same canonical bytes.
pub fn canonical_json(value: &serde_json::Value) -> Vec<u8> {
    use serde_json::Value;
    fn write(value: &Value, out: &mut Vec<u8>) {
        match value {
            Value::Object(members) => {
                let mut sorted: Vec<(&String, &Value)> =
                    members.iter().filter(|(_, v)| !v.is_null()).collect();
                sorted.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
                out.push(b'{');
                for (i, (key, v)) in sorted.into_iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    out.extend(serde_json::to_vec(key).expect("a string serialises"));
                    out.push(b':');
                    write(v, out);
                }
                out.push(b'}');
            }
            Value::Array(items) => {
                out.push(b'[');
                for (i, v) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    write(v, out);
                }
                out.push(b']');
            }
            scalar => out.extend(serde_json::to_vec(scalar).expect("a scalar serialises")),
        }
    }
    let mut out = Vec::new();
    write(value, &mut out);
    out
}

/// Consul caps KV values at 512 KB; a manifest must fit.
pub const KV_VALUE_LIMIT: usize = 512 * 1024;

/// One shard of an index generation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardEntry {
    /// Shard number, 0-based, also the row of its centroid.
    pub shard: u32,
    /// sha256 of the shard file: its content address and blob name.
    pub sha256: String,
    /// Bytes of the shard file.
    pub size: u64,
    /// Items (queries) in the shard.
    pub items: u64,
}

/// The fine clusters of a dg: the unit a query searches. Each cluster lives in one shard
/// file as its own arroy index (index id = cluster number); a query probes the clusters
/// whose centroids are nearest and each shard searches only the clusters it is asked for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterTable {
    /// Shard holding each cluster, row i for cluster i.
    pub shard_of: Vec<u32>,
    /// sha256 of the centroid bytes: `shard_of.len() x dims` little-endian f32, row i for
    /// cluster i, each row L2-normalised.
    pub centroids_sha256: String,
    /// The centroid bytes are stored in this many KV values (`KvLayout::centroid_chunk`).
    pub centroid_chunks: u32,
}

/// Vector dimensions a manifest may name at most (sentence-embedding models have 384 to
/// 4096); bounds every size computed from a manifest.
pub const MAX_DIMS: usize = 8192;

/// Clusters a dg may have at most: arroy index ids are u16.
pub const MAX_CLUSTERS: usize = u16::MAX as usize + 1;

/// How the generation was built (recorded so a build can be reproduced and compared).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BuildInfo {
    /// sha256 of the de-duplicated corpus texts, in order.
    pub corpus_sha256: String,
    pub seed: u64,
    /// Lloyd iterations of the shard-level k-means.
    pub kmeans_iterations: usize,
    /// Fine clusters asked for (the table holds about this many).
    pub clusters_requested: usize,
    /// Set when the dg was built incrementally (`simq-indexer build --base`): it keeps
    /// this base's centroids and reuses its unchanged shard files byte for byte. Absent
    /// in full builds (their manifests, and so their dg ids, are as before).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<BaseInfo>,
}

/// The base of an incremental build and what changed against it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BaseInfo {
    /// The dg whose centroids, model and unchanged shard files were kept.
    pub dg: String,
    /// Texts added and removed against it.
    pub added: u64,
    pub removed: u64,
    /// Shards whose file was written again (the others are the base's bytes).
    pub shards_rewritten: Vec<u32>,
}

/// An index generation ("dg"): everything a balancer needs to route, and everything a
/// shard needs to verify its file. Its id is a content address of the rest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: u32,
    /// `dg-<first 16 hex of the sha256 of this manifest with dg = "">`.
    pub dg: String,
    /// Model id of the embedder that made the vectors; queries must use the same.
    pub model_id: String,
    pub dims: usize,
    /// Always "cosine".
    pub distance: String,
    pub items: u64,
    pub build: BuildInfo,
    pub clusters: ClusterTable,
    pub shards: Vec<ShardEntry>,
}

impl Manifest {
    /// The content address of a manifest: a hash of its JSON with `dg` empty; canonical
    /// JSON from format 3 on, this struct's serialisation for format 2 (see
    /// [`READABLE_MANIFEST_FORMATS`]).
    pub fn content_id(&self) -> String {
        let mut anonymous = self.clone();
        anonymous.dg = String::new();
        let bytes = if self.format <= 2 {
            serde_json::to_vec(&anonymous).expect("manifest serialises")
        } else {
            canonical_json(&serde_json::to_value(&anonymous).expect("manifest serialises"))
        };
        format!("dg-{}", &hex::encode(Sha256::digest(&bytes))[..16])
    }

    /// Set `dg` to the content address.
    pub fn seal(mut self) -> Self {
        self.dg = self.content_id();
        self
    }

    /// Check the invariants a reader relies on; the message names what is wrong.
    pub fn validate(&self) -> Result<(), crate::Invalid> {
        if !READABLE_MANIFEST_FORMATS.contains(&self.format) {
            return Err(format!(
                "manifest format {} (this build reads formats {} to {})",
                self.format,
                READABLE_MANIFEST_FORMATS.start(),
                READABLE_MANIFEST_FORMATS.end()
            )
            .into());
        }
        if self.dg != self.content_id() {
            return Err(format!(
                "dg {} does not match the manifest's content ({})",
                self.dg,
                self.content_id()
            )
            .into());
        }
        if self.shards.is_empty() {
            return Err("the manifest lists no shards".into());
        }
        if self.dims == 0 || self.dims > MAX_DIMS {
            return Err(format!("dims is {}; must be 1 to {MAX_DIMS}", self.dims).into());
        }
        let clusters = self.clusters.shard_of.len();
        if clusters < self.shards.len() || clusters > MAX_CLUSTERS {
            return Err(format!(
                "{clusters} clusters for {} shards; need at least one per shard and at most {MAX_CLUSTERS}",
                self.shards.len()
            ).into());
        }
        if let Some((c, s)) = self
            .clusters
            .shard_of
            .iter()
            .enumerate()
            .find(|(_, &s)| s as usize >= self.shards.len())
        {
            return Err(format!(
                "cluster {c} is in shard {s}, but there are {} shards",
                self.shards.len()
            )
            .into());
        }
        let bytes = clusters * self.dims * 4;
        let chunks = self.clusters.centroid_chunks as usize;
        if chunks != bytes.div_ceil(crate::routing::CENTROID_CHUNK_BYTES) {
            return Err(format!(
                "{chunks} centroid chunks for {bytes} bytes of centroids; expected {}",
                bytes.div_ceil(crate::routing::CENTROID_CHUNK_BYTES)
            )
            .into());
        }
        if let Some(s) = self
            .shards
            .iter()
            .enumerate()
            .find(|(i, s)| s.shard as usize != *i)
        {
            return Err(format!("shard entry {} is numbered {}", s.0, s.1.shard).into());
        }
        Ok(())
    }
}

/// The active pointer: which dg answers queries, and which one it replaced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActiveDg {
    pub dg: String,
    pub previous: Option<String>,
    /// RFC 3339 time of the flip.
    pub flipped_at: String,
}

/// Is `name` a dg id as [`Manifest::content_id`] makes them (`dg-` and 16 hex digits)?
/// Anything else read from Consul is refused before it becomes part of a key or a path.
pub fn is_dg_name(name: &str) -> bool {
    name.strip_prefix("dg-").is_some_and(|hex| {
        hex.len() == 16
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

impl ActiveDg {
    /// The pointer names dgs only (its values become Consul keys and file paths).
    pub fn validate(&self) -> Result<(), crate::Invalid> {
        for name in std::iter::once(&self.dg).chain(&self.previous) {
            if !is_dg_name(name) {
                return Err(
                    format!("{name:?} is not a dg id (dg- and 16 lowercase hex digits)").into(),
                );
            }
        }
        Ok(())
    }
}

/// "dg-b (previous dg-a)", or "dg-b (no previous dg)": how the CLI reports a pointer.
impl std::fmt::Display for ActiveDg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.previous {
            Some(p) => write!(f, "{} (previous {p})", self.dg),
            None => write!(f, "{} (no previous dg)", self.dg),
        }
    }
}

/// Where simq's keys live in Consul KV.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvLayout {
    prefix: String,
}

impl Default for KvLayout {
    fn default() -> Self {
        Self::new("simq/")
    }
}

impl KvLayout {
    /// Keys under `prefix` (a trailing `/` is added when missing).
    pub fn new(prefix: &str) -> Self {
        let mut prefix = prefix.trim_start_matches('/').to_string();
        if !prefix.is_empty() && !prefix.ends_with('/') {
            prefix.push('/');
        }
        Self { prefix }
    }

    pub fn active(&self) -> String {
        format!("{}active", self.prefix)
    }

    pub fn manifest(&self, dg: &str) -> String {
        format!("{}dg/{dg}/manifest", self.prefix)
    }

    /// The traffic split between the active dg and a candidate (see [`crate::traffic`]).
    pub fn traffic(&self) -> String {
        format!("{}traffic", self.prefix)
    }

    /// The lock that lets one rollout (or rollback, or flip) run at a time.
    pub fn rollout_lock(&self) -> String {
        format!("{}rollout/lock", self.prefix)
    }

    /// The record of API key `id` (see [`crate::apikeys`]).
    pub fn api_key(&self, id: &str) -> String {
        format!("{}keys/{id}", self.prefix)
    }

    /// Where every API key record lives (read recursively).
    pub fn api_keys(&self) -> String {
        format!("{}keys/", self.prefix)
    }

    /// Part `i` of the dg's centroid bytes.
    pub fn centroid_chunk(&self, dg: &str, i: usize) -> String {
        format!("{}dg/{dg}/centroids/{i}", self.prefix)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The dgs kept in `testdata/`, as they were published: (directory, dg, format).
    const KEPT: [(&str, &str, u32); 2] = [
        ("format-2", "dg-cefd5fb3d5bba8c0", 2),
        ("format-3", "dg-166ebf6e0a7486a2", 3),
    ];

    fn testdata(dir: &str, file: &str) -> std::path::PathBuf {
        // Read at run time (cargo test sets it): a binary reused from another checkout
        // through a shared target dir must not look in that checkout.
        std::env::var_os("CARGO_MANIFEST_DIR")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into())
            .join("../../testdata")
            .join(dir)
            .join(file)
    }

    #[test]
    fn kept_dgs_keep_their_ids_and_their_centroids() {
        for (dir, dg, format) in KEPT {
            let bytes = std::fs::read(testdata(dir, "manifest.json")).unwrap();
            let m: Manifest = serde_json::from_slice(&bytes)
                .unwrap_or_else(|e| panic!("the {dir} manifest parses: {e}"));
            assert_eq!(m.format, format);
            m.validate()
                .unwrap_or_else(|e| panic!("the {dir} manifest validates: {e}"));
            assert_eq!(m.dg, dg);
            assert_eq!(
                m.content_id(),
                dg,
                "the id of a published dg never changes ({dir})"
            );
            // Format 3 keeps format 2's shard file and centroids (only the id rule changed).
            let centroids = std::fs::read(testdata("format-2", "centroids.f32")).unwrap();
            let map = crate::CentroidMap::from_bytes(&m, &centroids)
                .unwrap_or_else(|e| panic!("the {dir} centroids load: {e}"));
            assert_eq!(map.clusters(), 2);
        }
    }

    #[test]
    fn pointers_name_dgs_only() {
        let ok = ActiveDg {
            dg: "dg-0123456789abcdef".into(),
            previous: Some("dg-fedcba9876543210".into()),
            flipped_at: String::new(),
        };
        assert!(ok.validate().is_ok());
        for bad in [
            "dg-0123",
            "../../x",
            "dg-0123456789ABCDEF",
            "dg-0123456789abcdeg",
            "",
        ] {
            let p = ActiveDg {
                dg: bad.into(),
                ..ok.clone()
            };
            assert!(p.validate().unwrap_err().0.contains("not a dg id"), "{bad}");
            let p = ActiveDg {
                previous: Some(bad.into()),
                ..ok.clone()
            };
            assert!(p.validate().is_err(), "previous {bad}");
        }
    }

    /// A manifest over 2 shards and 3 clusters of 2 dims (centroids in
    /// [`crate::routing::tests`]).
    pub(crate) fn manifest() -> Manifest {
        let centroids = crate::routing::tests::centroid_bytes();
        Manifest {
            format: MANIFEST_FORMAT,
            dg: String::new(),
            model_id: "m-1".into(),
            dims: 2,
            distance: "cosine".into(),
            items: 3,
            build: BuildInfo {
                corpus_sha256: "c".into(),
                seed: 1,
                kmeans_iterations: 3,
                clusters_requested: 3,
                base: None,
            },
            clusters: ClusterTable {
                shard_of: vec![0, 1, 0],
                centroids_sha256: hex::encode(Sha256::digest(&centroids)),
                centroid_chunks: 1,
            },
            shards: vec![
                ShardEntry {
                    shard: 0,
                    sha256: "a".into(),
                    size: 1,
                    items: 2,
                },
                ShardEntry {
                    shard: 1,
                    sha256: "b".into(),
                    size: 1,
                    items: 1,
                },
            ],
        }
        .seal()
    }

    #[test]
    fn dg_id_is_a_content_address() {
        let m = manifest();
        assert!(m.dg.starts_with("dg-") && m.dg.len() == 19);
        assert_eq!(m.validate(), Ok(()));
        let mut other = m.clone();
        other.shards[1].sha256 = "changed".into();
        assert_ne!(other.content_id(), m.dg);
        assert!(other.validate().unwrap_err().0.contains("does not match"));
    }

    #[test]
    fn canonical_json_ignores_member_order_whitespace_and_nulls() {
        let a: serde_json::Value =
            serde_json::from_str(r#"{"b": [1, {"y": "é\n", "x": null}], "a": {"d": 2, "c": 1}}"#)
                .unwrap();
        let b: serde_json::Value =
            serde_json::from_str(r#"{"a":{"c":1,"d":2},"b":[1,{"y":"é\n"}]}"#).unwrap();
        assert_eq!(canonical_json(&a), canonical_json(&b));
        assert_eq!(
            String::from_utf8(canonical_json(&a)).unwrap(),
            r#"{"a":{"c":1,"d":2},"b":[1,{"y":"é\n"}]}"#
        );
        let reordered: serde_json::Value =
            serde_json::from_str(r#"{"b": [{"y": "é\n"}, 1], "a": {"c": 1, "d": 2}}"#).unwrap();
        assert_ne!(
            canonical_json(&a),
            canonical_json(&reordered),
            "array order counts"
        );
    }

    #[test]
    fn a_format_3_id_does_not_depend_on_member_order_or_layout() {
        let m = manifest();
        assert_eq!(m.format, 3);
        // The same manifest written with members sorted (not in declaration order) and
        // pretty-printed: another text, the same dg.
        let sorted = canonical_json(&serde_json::to_value(&m).unwrap());
        assert_ne!(sorted, serde_json::to_vec(&m).unwrap());
        let pretty = serde_json::to_string_pretty(
            &serde_json::from_slice::<serde_json::Value>(&sorted).unwrap(),
        )
        .unwrap();
        let read: Manifest = serde_json::from_str(&pretty).unwrap();
        assert_eq!(read.validate(), Ok(()));
        assert_eq!(read.content_id(), m.dg);
    }

    #[test]
    fn unknown_manifest_members_are_refused_by_name() {
        let mut v = serde_json::to_value(manifest()).unwrap();
        v["build"]["tokenizer"] = "x".into();
        let e = serde_json::from_value::<Manifest>(v)
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field `tokenizer`"), "{e}");
    }

    #[test]
    fn clusters_must_name_existing_shards() {
        let mut m = manifest();
        m.clusters.shard_of[2] = 5;
        let m = m.seal();
        assert_eq!(
            m.validate().unwrap_err().0,
            "cluster 2 is in shard 5, but there are 2 shards"
        );
    }

    #[test]
    fn every_shard_needs_a_cluster_and_chunks_match_the_bytes() {
        let mut m = manifest();
        m.clusters.shard_of = vec![0];
        assert!(m
            .clone()
            .seal()
            .validate()
            .unwrap_err()
            .0
            .contains("1 clusters for 2 shards"));
        let mut m = manifest();
        m.clusters.centroid_chunks = 2;
        assert!(m
            .seal()
            .validate()
            .unwrap_err()
            .0
            .contains("2 centroid chunks"));
    }

    #[test]
    fn layout_keys_use_the_prefix() {
        assert_eq!(KvLayout::default().active(), "simq/active");
        assert_eq!(KvLayout::new("x").manifest("dg-1"), "x/dg/dg-1/manifest");
        assert_eq!(
            KvLayout::new("x").centroid_chunk("dg-1", 3),
            "x/dg/dg-1/centroids/3"
        );
    }
}

/// Hostile input: manifests, pointers and key records from KV (any bytes, or well-formed
/// JSON with any values, sealed so the content check passes) are refused with a reason
/// or accepted, never a panic; an accepted manifest's centroid map rejects wrong bytes.
#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    fn manifest() -> impl Strategy<Value = Manifest> {
        (
            0u32..5,
            prop_oneof![
                Just(0usize),
                1usize..600,
                Just(usize::MAX / 2),
                any::<usize>()
            ],
            proptest::collection::vec(any::<u32>().prop_map(|s| s % 6), 0..40),
            any::<u32>().prop_map(|c| c % 8),
            1usize..6,
        )
            .prop_map(|(format, dims, shard_of, centroid_chunks, shards)| {
                Manifest {
                    format,
                    dg: String::new(),
                    model_id: "m".into(),
                    dims,
                    distance: "cosine".into(),
                    items: 10,
                    build: BuildInfo {
                        corpus_sha256: String::new(),
                        seed: 1,
                        kmeans_iterations: 1,
                        clusters_requested: 1,
                        base: None,
                    },
                    clusters: ClusterTable {
                        shard_of,
                        centroids_sha256: String::new(),
                        centroid_chunks,
                    },
                    shards: (0..shards as u32)
                        .map(|shard| ShardEntry {
                            shard,
                            sha256: String::new(),
                            size: 1,
                            items: 1,
                        })
                        .collect(),
                }
                .seal()
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]

        #[test]
        fn any_bytes_are_refused_or_read(bytes in proptest::collection::vec(any::<u8>(), 0..1024)) {
            if let Ok(m) = serde_json::from_slice::<Manifest>(&bytes) {
                let _ = m.validate();
            }
            if let Ok(p) = serde_json::from_slice::<ActiveDg>(&bytes) {
                let _ = p.validate();
            }
            if let Ok(r) = serde_json::from_slice::<crate::apikeys::ApiKeyRecord>(&bytes) {
                let _ = r.validate();
            }
        }

        #[test]
        fn sealed_manifests_with_any_values_validate_or_say_why(
            m in manifest(),
            centroids in proptest::collection::vec(any::<u8>(), 0..256),
        ) {
            match m.validate() {
                Ok(()) => {
                    prop_assert!(m.dims >= 1 && m.dims <= MAX_DIMS);
                    // Random bytes are never taken for its centroids.
                    prop_assert!(crate::CentroidMap::from_bytes(&m, &centroids).is_err());
                }
                Err(reason) => prop_assert!(!reason.0.is_empty()),
            }
        }
    }
}
