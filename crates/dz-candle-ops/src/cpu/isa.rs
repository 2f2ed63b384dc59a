//! Run-time ISA dispatch for the CPU kernels.
//!
//! The workspace builds for the baseline target (x86-64: SSE2), where the compiler vectorizes the decode
//! loops 4 lanes wide. A [`Kernel`] is written once, generically, with every function it calls
//! `#[inline(always)]` (and no closures in hot loops: a closure the compiler declines to inline is
//! compiled on its own, for the baseline); [`dispatch`] runs it inside a `#[target_feature]` wrapper for
//! the best ISA the CPU has (AVX-512, AVX2+FMA), so the same source is compiled again, inlined, for those
//! registers. The dot products, which the auto-vectorizer handles poorly, are written with AVX2/FMA
//! intrinsics ([`Isa::dots`]). The `gemm` crate does the same for its own kernels.

/// A piece of CPU work compiled once per ISA level.
pub(crate) trait Kernel {
    /// What it returns.
    type Output;
    /// Runs the work with the ISA `I`. Implementations must be `#[inline(always)]` (and so must
    /// everything hot they call) to be compiled for the wrapper's ISA.
    ///
    /// # Safety
    /// The CPU must have `I`'s features: call it through [`dispatch`], which checks them.
    unsafe fn run<I: Isa>(self) -> Self::Output;
}

/// An instruction set level, with the kernels written for it by hand.
pub(crate) trait Isa {
    /// `[dot(xs[0], w), .., dot(xs[M-1], w)]`; every `xs[j]` is at least as long as `w`.
    ///
    /// # Safety
    /// The CPU must have the features of `Self` ([`dispatch`] checks them before it runs a kernel with
    /// `Self`).
    unsafe fn dots<const M: usize>(xs: &[&[f32]; M], w: &[f32]) -> [f32; M];
}

/// Baseline: portable code, vectorized by the compiler for the build target.
pub(crate) struct Generic;
/// AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
pub(crate) struct Avx2;
/// AVX-512 (F, BW, VL) with AVX2 and FMA: the decoders are compiled for 512-bit registers; the dot
/// products use the AVX2 kernels (AVX-512 intrinsics need a newer Rust than the workspace's 1.88).
#[cfg(target_arch = "x86_64")]
pub(crate) struct Avx512;

/// An ISA level the kernels are compiled for, in increasing order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Level {
    /// The build target's baseline.
    Generic,
    /// AVX2 and FMA.
    Avx2,
    /// AVX-512 F/BW/VL (with AVX2 and FMA).
    Avx512,
}

impl Level {
    /// The best level the CPU has (`is_x86_feature_detected!` caches its answers).
    #[inline]
    pub(crate) fn detect() -> Level {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            if has!("avx2") && has!("fma") {
                if has!("avx512f") && has!("avx512bw") && has!("avx512vl") {
                    return Level::Avx512;
                }
                return Level::Avx2;
            }
        }
        Level::Generic
    }

    /// Every level the CPU can run, lowest first (for tests that compare them).
    #[cfg(test)]
    pub(crate) fn available() -> Vec<Level> {
        [Level::Generic, Level::Avx2, Level::Avx512]
            .into_iter()
            .filter(|&l| l <= Level::detect())
            .collect()
    }
}

/// Runs `k` compiled for `level`, or for the best level the CPU has if that is lower.
#[inline]
pub(crate) fn dispatch<K: Kernel>(level: Level, k: K) -> K::Output {
    #[cfg(target_arch = "x86_64")]
    match level.min(Level::detect()) {
        // SAFETY: the CPU has every feature the wrapper enables (`detect` checked them).
        Level::Avx512 => return unsafe { run_avx512(k) },
        // SAFETY: as above.
        Level::Avx2 => return unsafe { run_avx2(k) },
        Level::Generic => {}
    }
    let _ = level;
    // SAFETY: the baseline needs no feature.
    unsafe { k.run::<Generic>() }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
unsafe fn run_avx512<K: Kernel>(k: K) -> K::Output {
    // SAFETY: the caller checked the features, which this function's are.
    unsafe { k.run::<Avx512>() }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn run_avx2<K: Kernel>(k: K) -> K::Output {
    // SAFETY: as above.
    unsafe { k.run::<Avx2>() }
}

impl Isa for Generic {
    #[inline(always)]
    unsafe fn dots<const M: usize>(xs: &[&[f32]; M], w: &[f32]) -> [f32; M] {
        dots_portable::<M>(xs, w)
    }
}

#[cfg(target_arch = "x86_64")]
impl Isa for Avx2 {
    #[inline(always)]
    unsafe fn dots<const M: usize>(xs: &[&[f32]; M], w: &[f32]) -> [f32; M] {
        // SAFETY: the caller guarantees AVX2 and FMA.
        unsafe { dots_avx2::<M>(xs, w) }
    }
}

#[cfg(target_arch = "x86_64")]
impl Isa for Avx512 {
    #[inline(always)]
    unsafe fn dots<const M: usize>(xs: &[&[f32]; M], w: &[f32]) -> [f32; M] {
        // SAFETY: the caller guarantees AVX-512, which comes with AVX2 and FMA here (dispatch checks all).
        unsafe { dots_avx2::<M>(xs, w) }
    }
}

/// The portable dot products: 8 independent sums per row, then a pairwise reduction.
#[inline(always)]
fn dots_portable<const M: usize>(xs: &[&[f32]; M], w: &[f32]) -> [f32; M] {
    const L: usize = 8;
    let (wc, wt) = w.as_chunks::<L>();
    let mut out = [0.0f32; M];
    for (o, x) in out.iter_mut().zip(xs) {
        let (xc, _) = x[..w.len()].as_chunks::<L>();
        let mut acc = [0.0f32; L];
        for (xv, wv) in xc.iter().zip(wc) {
            for l in 0..L {
                acc[l] += xv[l] * wv[l];
            }
        }
        let mut s =
            ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
        for (xv, wv) in x[wc.len() * L..w.len()].iter().zip(wt) {
            s += xv * wv;
        }
        *o = s;
    }
    out
}

/// The AVX2/FMA dot products with enough independent sums to hide the FMA latency (4 cycles, 2 per
/// cycle: 8 chains): `U` vectors per row, `M * U` around 8.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn dots_avx2<const M: usize>(xs: &[&[f32]; M], w: &[f32]) -> [f32; M] {
    // SAFETY (all four): the caller's features, which are this function's.
    match M {
        1 => unsafe { dots_avx2_u::<M, 8>(xs, w) },
        2 => unsafe { dots_avx2_u::<M, 4>(xs, w) },
        3 | 4 => unsafe { dots_avx2_u::<M, 2>(xs, w) },
        _ => unsafe { dots_avx2_u::<M, 1>(xs, w) },
    }
}

/// [`dots_avx2`] with `U` accumulators per row: each 8-float vector of `w` is loaded once and
/// multiplied into the `M` rows.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn dots_avx2_u<const M: usize, const U: usize>(xs: &[&[f32]; M], w: &[f32]) -> [f32; M] {
    use std::arch::x86_64::*;
    let n = w.len();
    for x in xs {
        assert!(x.len() >= n, "dots: a row is shorter than w");
    }
    let mut acc = [[_mm256_setzero_ps(); U]; M];
    let mut i = 0;
    // SAFETY (all loads below): `i + 8 * U <= n` (or `i + 8 <= n`) and every row is at least `n` long
    // (asserted above), so each 8-float unaligned load reads inside its slice.
    while i + 8 * U <= n {
        let mut wv = [_mm256_setzero_ps(); U];
        for (u, v) in wv.iter_mut().enumerate() {
            *v = unsafe { _mm256_loadu_ps(w.as_ptr().add(i + 8 * u)) };
        }
        for (a, x) in acc.iter_mut().zip(xs) {
            for (u, (au, wu)) in a.iter_mut().zip(&wv).enumerate() {
                let xv = unsafe { _mm256_loadu_ps(x.as_ptr().add(i + 8 * u)) };
                *au = _mm256_fmadd_ps(xv, *wu, *au);
            }
        }
        i += 8 * U;
    }
    while i + 8 <= n {
        let wv = unsafe { _mm256_loadu_ps(w.as_ptr().add(i)) };
        for (a, x) in acc.iter_mut().zip(xs) {
            let xv = unsafe { _mm256_loadu_ps(x.as_ptr().add(i)) };
            a[0] = _mm256_fmadd_ps(xv, wv, a[0]);
        }
        i += 8;
    }
    let mut out = [0.0f32; M];
    for ((o, a), x) in out.iter_mut().zip(&acc).zip(xs) {
        let mut v = a[0];
        for au in &a[1..] {
            v = _mm256_add_ps(v, *au);
        }
        let mut lanes = [0.0f32; 8];
        // SAFETY: `lanes` holds 8 floats.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), v) };
        let mut s = ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5]))
            + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]));
        for (xv, wv) in x[i..n].iter().zip(&w[i..]) {
            s = xv.mul_add(*wv, s);
        }
        *o = s;
    }
    out
}
