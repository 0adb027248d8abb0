//! `f32::exp` over slices: the same bits as glibc's `expf` (what `f32::exp` calls on
//! Linux), several values per instruction. The softmax of attention, the log-softmax rows
//! of decoding steps and the GELU of inference take one `exp` per value; libm's scalar
//! `expf` was 8-10% of a batch-8 decoding step's profile.

/// `2^(i/32)` for `i` in `0..32` as f64 bits, less `i << 47`, so that adding the reduced
/// exponent's bits `k << 47` (k = 32 e + i) gives `2^(k/32)`.
fn exp2_table() -> &'static [u64; 32] {
    static TABLE: std::sync::OnceLock<[u64; 32]> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        std::array::from_fn(|i| (i as f64 / 32.0).exp2().to_bits() - ((i as u64) << 47))
    })
}

/// `e^x` for `x` in `[-103, 88]` as glibc's `expf` computes it (what `f32::exp` calls on
/// Linux; the same bits with or without FMA contraction, tests check): `x * 32 / ln 2`
/// rounded to `k`, `2^(k/32)` from the table and a cubic in the remainder, in f64.
#[inline(always)]
fn exp_core(x: f32, table: &[u64; 32]) -> f32 {
    const N: f64 = 32.0;
    let inv_ln2_n = f64::from_bits(0x3ff7_1547_652b_82fe) * N;
    let shift = f64::from_bits(0x4338_0000_0000_0000); // 1.5 * 2^52
    let c0 = f64::from_bits(0x3fac_6af8_4b91_2394) / (N * N * N);
    let c1 = f64::from_bits(0x3fce_bfce_50fa_c4f3) / (N * N);
    let c2 = f64::from_bits(0x3fe6_2e42_ff0c_52d6) / N;
    let z = inv_ln2_n * x as f64;
    let kd = z + shift;
    let ki = kd.to_bits();
    let r = z - (kd - shift);
    let s = f64::from_bits(table[(ki % 32) as usize].wrapping_add(ki << 47));
    let p = c0 * r + c1;
    let y = p * (r * r) + (c2 * r + 1.0);
    (y * s) as f32
}

#[inline(always)]
fn exp_body(v: &mut [f32]) {
    let table = exp2_table();
    let mut orig = [0f32; 64];
    for chunk in v.chunks_mut(64) {
        let n = chunk.len();
        orig[..n].copy_from_slice(chunk);
        for (o, &x) in chunk.iter_mut().zip(&orig[..n]) {
            *o = exp_core(x, table);
        }
        // Outside the core's range (overflow, deep underflow, infinities, NaN): libm.
        for (o, &x) in chunk.iter_mut().zip(&orig[..n]) {
            if !(-103.0..=88.0).contains(&x) {
                *o = x.exp();
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
unsafe fn exp_avx512(v: &mut [f32]) {
    exp_body(v)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp_avx2(v: &mut [f32]) {
    exp_body(v)
}

/// `v = e^v` in place, the same bits as `f32::exp` on each value, several values per
/// instruction (a decoding step at batch 8 takes ~475k of them for its log-softmax rows;
/// libm's scalar `expf` was 8-10% of its profile).
pub fn exp_in_place(v: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("fma") {
            // SAFETY: the features were just detected.
            unsafe { exp_avx512(v) };
            return;
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            // SAFETY: the features were just detected.
            unsafe { exp_avx2(v) };
            return;
        }
    }
    exp_body(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_libm_bit_for_bit() {
        // Every 61st f32 over the core's range and beyond it, both signs, and the edges.
        let mut xs: Vec<f32> = Vec::new();
        for (lo, hi) in [(0x8000_0000u32, 0xc2d0_0000u32), (0, 0x42b2_0000)] {
            xs.extend((lo..=hi).step_by(61).map(f32::from_bits));
        }
        xs.extend([
            0.0,
            -0.0,
            88.0,
            88.7,
            89.0,
            -103.0,
            -103.5,
            -104.0,
            -150.0,
            f32::MIN,
            f32::MAX,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            f32::MIN_POSITIVE,
        ]);
        let mut got = xs.clone();
        exp_in_place(&mut got);
        for (x, g) in xs.iter().zip(&got) {
            let want = x.exp();
            let same = g.to_bits() == want.to_bits() || (g.is_nan() && want.is_nan());
            assert!(same, "exp({x:e}) = {g:e}, libm {want:e}");
        }
        // The portable body too (what CPUs without AVX2 run).
        let mut got = xs.clone();
        exp_body(&mut got);
        let mismatch = xs
            .iter()
            .zip(&got)
            .filter(|(x, g)| g.to_bits() != x.exp().to_bits() && !x.is_nan())
            .count();
        assert_eq!(mismatch, 0);
    }
}
