//! simq's vector kernels: the f32 dot product, int8 quantisation and the int8 dot product,
//! each with an AVX2 version chosen at run time and a plain one the compiler vectorises.
//! Routing (`simq-contract`'s `CentroidMap`), every shard scan and the indexer's k-means
//! spend their time here.
//!
//! This is the one crate that may use `unsafe` (the workspace denies it elsewhere): the
//! `#[target_feature]` functions are unsafe to call, and each call is made only after
//! [`has_avx2_fma`] found the features on this CPU. Every block says why it is sound.
#![allow(unsafe_code)]

/// Dot product: AVX2 + FMA when the CPU has them (checked once), else 8 plain lanes.
/// Routing and every shard scan spend their time here.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the CPU supports the features the function is compiled for.
        return unsafe { dot_avx2_fma(a, b) };
    }
    dot_lanes(a, b)
}

/// Does this CPU have AVX2 and FMA? Checked once; vector kernels dispatch on it.
pub fn has_avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static AVX2_FMA: OnceLock<bool> = OnceLock::new();
        *AVX2_FMA
            .get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2_fma(a: &[f32], b: &[f32]) -> f32 {
    // The same lane loop; compiled with these features it becomes 256-bit FMAs.
    dot_lanes(a, b)
}

/// Summed in 8 lanes so the compiler vectorises it.
#[inline(always)]
fn dot_lanes(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            lanes[i] = x[i].mul_add(y[i], lanes[i]);
        }
    }
    let tail: f32 = ra.iter().zip(rb).map(|(x, y)| x * y).sum();
    lanes.iter().sum::<f32>() + tail
}

/// One vector as int8 codes and its scale: `code = round(x / scale)` with
/// `scale = max |x| / 127`, so `x . y ~= scale_x * scale_y * (codes_x . codes_y)`.
/// A quarter of the bytes of f32: routing shortlists clusters by them, and every shard
/// scans its items' codes.
#[derive(Debug, Clone, PartialEq)]
pub struct Quantized {
    pub scale: f32,
    pub codes: Vec<i8>,
}

/// Quantise one vector (see [`Quantized`]).
pub fn quantize(v: &[f32]) -> Quantized {
    let max = v.iter().fold(0.0f32, |m, x| m.max(x.abs()));
    let scale = if max > 0.0 { max / 127.0 } else { 1.0 };
    let codes = v
        .iter()
        .map(|x| (x / scale).round().clamp(-127.0, 127.0) as i8)
        .collect();
    Quantized { scale, codes }
}

/// Dot product of int8 codes (`a` as stored bytes, any values; `b` in -127..=127, as
/// [`quantize`] makes them), exact in i32.
pub fn dot_i8(a: &[u8], b: &[i8]) -> i32 {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the CPU supports the features the function is compiled for.
        return unsafe { dot_i8_avx2(a, b) };
    }
    dot_i8_lanes(a, b)
}

/// 32 products per step: `maddubs` multiplies unsigned by signed bytes, so `a` goes in as
/// `|a|` and `b` takes `a`'s sign; pairs of products (at most 2 x 128 x 127) fit its i16
/// sums without saturating. (The compiler's own vectorisation of the plain loop widens
/// to i16 first: half the products per instruction.)
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn dot_i8_avx2(a: &[u8], b: &[i8]) -> i32 {
    use std::arch::x86_64::*;
    let n = a.len().min(b.len());
    let steps = n / 32;
    let ones = _mm256_set1_epi16(1);
    let mut sum = _mm256_setzero_si256();
    for i in 0..steps {
        // SAFETY: i * 32 + 32 <= n, within both slices; loadu has no alignment needs.
        let (va, vb) = unsafe {
            (
                _mm256_loadu_si256(a.as_ptr().add(i * 32) as *const __m256i),
                _mm256_loadu_si256(b.as_ptr().add(i * 32) as *const __m256i),
            )
        };
        let pairs = _mm256_maddubs_epi16(_mm256_sign_epi8(va, va), _mm256_sign_epi8(vb, va));
        sum = _mm256_add_epi32(sum, _mm256_madd_epi16(pairs, ones));
    }
    let mut lanes = [0i32; 8];
    // SAFETY: `lanes` is 32 bytes.
    unsafe { _mm256_storeu_si256(lanes.as_mut_ptr() as *mut __m256i, sum) };
    lanes.iter().sum::<i32>() + dot_i8_lanes(&a[steps * 32..n], &b[steps * 32..n])
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
    fn dot_matches_the_plain_sum_for_any_length() {
        for n in [0, 1, 7, 8, 9, 383, 384] {
            let a: Vec<f32> = (0..n).map(|i| i as f32 * 0.5).collect();
            let b: Vec<f32> = (0..n).map(|i| 1.0 - i as f32 * 0.1).collect();
            let plain: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
            assert!(
                (dot(&a, &b) - plain).abs() <= 1e-3 * plain.abs().max(1.0),
                "n={n}"
            );
        }
    }

    #[test]
    fn the_int8_kernel_is_exact_for_any_stored_bytes() {
        for n in [0, 1, 31, 32, 33, 64, 383, 384, 385] {
            let a: Vec<u8> = (0..n).map(|i| (i * 37 + 128) as u8).collect();
            let b: Vec<i8> = (0..n)
                .map(|i| ((i * 53) % 255) as i32 - 127)
                .map(|x| x as i8)
                .collect();
            assert_eq!(dot_i8(&a, &b), dot_i8_lanes(&a, &b), "n={n}");
            let extreme_a = vec![0x80u8; n];
            let extreme_b = vec![127i8; n];
            assert_eq!(
                dot_i8(&extreme_a, &extreme_b),
                -128 * 127 * n as i32,
                "n={n}"
            );
            assert_eq!(dot_i8(&extreme_a, &vec![-127i8; n]), 128 * 127 * n as i32);
        }
    }

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
    fn the_zero_vector_quantises_without_dividing_by_zero() {
        let q = quantize(&[0.0; 8]);
        assert_eq!(q.codes, vec![0; 8]);
        assert!(q.scale.is_finite());
    }
}
