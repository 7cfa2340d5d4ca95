//! SIMD dispatch for the fused CPU loops: each loop is written once, as an
//! `#[inline(always)]` body of plain slice arithmetic that the compiler
//! vectorises, and compiled for several instruction sets; the widest one
//! the CPU runs is chosen at run time ([`multiversion!`] for AVX2, [`Isa`]
//! where an AVX-512 build exists too).
//!
//! No build contracts floating-point operations (no FMA is formed from a
//! separate multiply and add), so every build gives the same bits.

/// Defines `fn $name(args)` that runs `$body(args)` compiled for AVX2 and
/// FMA when the CPU has them (checked at run time; the loops are
/// compute-bound at SSE2 width), else the baseline build. `$body` must be
/// `#[inline(always)]` so that it is compiled into each version. No floating
/// point contraction happens in either build, so both give the same bits.
macro_rules! multiversion {
    ($(#[$m:meta])* $vis:vis fn $name:ident => $body:ident ($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)?) => {
        $(#[$m])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn wide($($arg: $ty),*) $(-> $ret)? {
                    $body($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU supports AVX2 and FMA (checked just above).
                    return unsafe { wide($($arg),*) };
                }
            }
            $body($($arg),*)
        }
    };
}
pub(crate) use multiversion;

/// The widest build of a fused loop the CPU runs: AVX-512 (F, BW, VL, DQ),
/// AVX2 with FMA, or the baseline. Every build does the same operations
/// without floating-point contraction, so all give the same bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Isa {
    Avx512,
    Avx2,
    Base,
}

impl Isa {
    /// What this CPU supports.
    pub(crate) fn detect() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            let avx2 = has!("avx2") && has!("fma");
            if avx2 && has!("avx512f") && has!("avx512bw") && has!("avx512vl") && has!("avx512dq") {
                return Isa::Avx512;
            }
            if avx2 {
                return Isa::Avx2;
            }
        }
        Isa::Base
    }
}
