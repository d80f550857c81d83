//! The scan block of a cluster: its items' vectors as int8 codes in one contiguous LMDB
//! value, so a probed cluster is read in one sequential pass instead of one arroy lookup
//! per item. The codes rank candidates; the best few are re-scored exactly with their
//! f32 vectors from arroy.
//!
//! Layout (little-endian): `n: u32`, `ids: [u32; n]`, `scales: [f32; n]`,
//! `codes: [i8; n * dims]`. Each vector is quantised on its own: `code = round(x / scale)`
//! with `scale = max |x| / 127`, so `x . q ~= scale_x * scale_q * (codes_x . codes_q)`.

pub use simq_vector::{dot_i8, quantize, Quantized};

/// Encode the scan block of `items` (id, vector).
pub fn encode(items: &[(u32, &[f32])], dims: usize) -> Vec<u8> {
    let n = items.len();
    let mut out = Vec::with_capacity(4 + n * (8 + dims));
    out.extend_from_slice(&(n as u32).to_le_bytes());
    let quantized: Vec<Quantized> = items.iter().map(|(_, v)| quantize(v)).collect();
    for (id, _) in items {
        out.extend_from_slice(&id.to_le_bytes());
    }
    for q in &quantized {
        out.extend_from_slice(&q.scale.to_le_bytes());
    }
    for q in &quantized {
        out.extend(q.codes.iter().map(|&c| c as u8));
    }
    out
}

/// A scan block read in place.
pub struct Block<'a> {
    n: usize,
    dims: usize,
    bytes: &'a [u8],
}

impl<'a> Block<'a> {
    /// Check the block's size against `dims`; None when it does not fit.
    pub fn parse(bytes: &'a [u8], dims: usize) -> Option<Self> {
        let n = u32::from_le_bytes(bytes.get(..4)?.try_into().ok()?) as usize;
        (bytes.len() == 4 + n * (8 + dims)).then_some(Self { n, dims, bytes })
    }

    pub fn len(&self) -> usize {
        self.n
    }

    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    fn u32_at(&self, offset: usize) -> [u8; 4] {
        self.bytes[offset..offset + 4].try_into().expect("4 bytes")
    }

    /// (id, approximate dot product with the query) of every item.
    pub fn scores(&self, query: &Quantized, mut out: impl FnMut(u32, f32)) {
        let codes_at = 4 + self.n * 8;
        for i in 0..self.n {
            let id = u32::from_le_bytes(self.u32_at(4 + i * 4));
            let scale = f32::from_le_bytes(self.u32_at(4 + self.n * 4 + i * 4));
            let codes = &self.bytes[codes_at + i * self.dims..codes_at + (i + 1) * self.dims];
            out(id, dot_i8(codes, &query.codes) as f32 * scale * query.scale);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_block_gives_every_item_with_its_id() {
        let v1 = [1.0f32, 0.0, 0.0, 0.0];
        let v2 = [0.0f32, 0.6, 0.8, 0.0];
        let bytes = encode(&[(7, &v1), (9, &v2)], 4);
        let block = Block::parse(&bytes, 4).unwrap();
        assert_eq!(block.len(), 2);
        let mut got = Vec::new();
        block.scores(&quantize(&[0.0, 0.6, 0.8, 0.0]), |id, s| got.push((id, s)));
        assert_eq!(got[0].0, 7);
        assert!(got[0].1.abs() < 1e-3);
        assert_eq!(got[1].0, 9);
        assert!((got[1].1 - 1.0).abs() < 0.01, "{got:?}");
        assert!(
            Block::parse(&bytes[..bytes.len() - 1], 4).is_none(),
            "size is checked"
        );
        assert!(Block::parse(&bytes, 5).is_none(), "dims are checked");
    }
}

/// Hostile input: a scan block of any bytes is refused or read within its bounds.
#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn any_block_bytes_are_refused_or_scored_in_bounds(
            bytes in proptest::collection::vec(any::<u8>(), 0..512),
            dims in 1usize..16,
        ) {
            if let Some(block) = Block::parse(&bytes, dims) {
                let query = quantize(&vec![0.5; dims]);
                let mut seen = 0;
                block.scores(&query, |_, _| seen += 1);
                prop_assert_eq!(seen, block.len());
            }
        }
    }
}
