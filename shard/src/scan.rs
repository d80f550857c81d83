//! The scan block of a cluster: its items' vectors as int8 codes in one contiguous LMDB
//! value, so a probed cluster is read in one sequential pass instead of one arroy lookup
//! per item. The codes rank candidates; the best few are re-scored exactly with their
//! f32 vectors from arroy.
//!
//! Layout (little-endian): `n: u32`, `ids: [u32; n]`, `scales: [f32; n]`,
//! `codes: [i8; n * dims]`. Each vector is quantised on its own: `code = round(x / scale)`
//! with `scale = max |x| / 127`, so `x . q ~= scale_x * scale_q * (codes_x . codes_q)`.

use simq_consul::routing::has_avx2_fma;

/// One vector as int8 codes and its scale.
#[derive(Debug, Clone, PartialEq)]
pub struct Quantized {
    pub scale: f32,
    pub codes: Vec<i8>,
}

/// Quantise one vector.
pub fn quantize(v: &[f32]) -> Quantized {
    let max = v.iter().fold(0.0f32, |m, x| m.max(x.abs()));
    let scale = if max > 0.0 { max / 127.0 } else { 1.0 };
    let codes = v
        .iter()
        .map(|x| (x / scale).round().clamp(-127.0, 127.0) as i8)
        .collect();
    Quantized { scale, codes }
}

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

/// Dot product of int8 codes (`a` as stored bytes), exact in i32.
pub fn dot_i8(a: &[u8], b: &[i8]) -> i32 {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the CPU supports the features the function is compiled for.
        return unsafe { dot_i8_avx2(a, b) };
    }
    dot_i8_lanes(a, b)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn dot_i8_avx2(a: &[u8], b: &[i8]) -> i32 {
    dot_i8_lanes(a, b)
}

#[inline(always)]
fn dot_i8_lanes(a: &[u8], b: &[i8]) -> i32 {
    a.iter()
        .zip(b)
        .map(|(&x, &y)| i32::from(x as i8 as i16 * y as i16))
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantised_dot_products_are_close_to_exact_ones() {
        let a: Vec<f32> = (0..384)
            .map(|i| ((i * 7 % 13) as f32 - 6.0) / 40.0)
            .collect();
        let b: Vec<f32> = (0..384)
            .map(|i| ((i * 5 % 11) as f32 - 5.0) / 35.0)
            .collect();
        let exact: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
        let (qa, qb) = (quantize(&a), quantize(&b));
        let bytes: Vec<u8> = qa.codes.iter().map(|&c| c as u8).collect();
        let approx = dot_i8(&bytes, &qb.codes) as f32 * qa.scale * qb.scale;
        assert!(
            (approx - exact).abs() < 0.01 * exact.abs().max(1.0),
            "{approx} vs {exact}"
        );
    }

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

    #[test]
    fn the_zero_vector_quantises_without_dividing_by_zero() {
        let q = quantize(&[0.0; 8]);
        assert_eq!(q.codes, vec![0; 8]);
        assert!(q.scale.is_finite());
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
