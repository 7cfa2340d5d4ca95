//! `rankone_moe`: each MLP task vector τi (out×in) is replaced by its top
//! k = `rank_k` SVD components, τi ≈ Σj uij sij vijᵀ, giving T·k rank-one
//! experts; a Linear(d→T·k) router weights them per block:
//! W = W0 + Σij rij uij sij vijᵀ (one routing weight per component, shared by
//! the gate, up and down projections of the block, as in FusionBench).
//!
//! The forward never forms W: with U = [uij] (out×T·k) and SV = [sij vijᵀ]
//! (T·k×in), W·x = W0·x + U ((SV·x) ⊙ r): two thin matmuls.
//!
//! The SVD is faer's, in f64 ([`crate::linalg::thin_svd`]); k is capped at
//! min(out, in). MLP biases, when the model has them, are task arithmetic
//! θ0 + λ Σ τi (FusionBench routes only the weights). Parameters held per
//! projection: T·k·(out + in); router per block: d·T·k + T·k.

use candle_core::Tensor;
use faer::Mat;

use super::frozen;
use crate::error::Result;
use crate::linalg::thin_svd;

/// The top-`k` factors of a row-major `rows×cols` matrix: `u` (`rows×k`,
/// row-major) and `sv` = diag(s) Vᵀ (`k×cols`, row-major). `k` must not
/// exceed min(rows, cols).
pub fn factors(tau: &[f32], rows: usize, cols: usize, k: usize) -> Result<(Vec<f32>, Vec<f32>)> {
    assert!(k <= rows.min(cols), "rank {k} exceeds min({rows}, {cols})");
    let a = Mat::<f64>::from_fn(rows, cols, |i, j| tau[i * cols + j] as f64);
    let svd = thin_svd(a.as_ref())?;
    let mut u = vec![0f32; rows * k];
    for i in 0..rows {
        for j in 0..k {
            u[i * k + j] = svd.u[(i, j)] as f32;
        }
    }
    let mut sv = vec![0f32; k * cols];
    for j in 0..k {
        for c in 0..cols {
            sv[j * cols + c] = (svd.s[j] * svd.v[(c, j)]) as f32;
        }
    }
    Ok((u, sv))
}

/// Σj rj uj (sj vjᵀ x) for the rows `x` `(batch·seq, in)` of a
/// `(batch, seq)` input, factors `u` `(out, E)` and `sv` `(E, in)`, routing
/// weights `(batch, 1 | seq, E)`; the result is `(batch, seq, out)`.
pub fn mix(
    x: &Tensor,
    (b, t): (usize, usize),
    u: &Tensor,
    sv: &Tensor,
    r: &Tensor,
) -> candle_core::Result<Tensor> {
    let (out, e) = u.dims2()?;
    let z = frozen::matmul_t(x, sv)?.reshape((b, t, e))?;
    let z = z.broadcast_mul(r)?.reshape((b * t, e))?;
    frozen::matmul_t(&z, u)?.reshape((b, t, out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn factors_rebuild_a_rank_one_matrix() {
        // [[3, 4], [6, 8]] = (1, 2)ᵀ (3, 4): rank one, σ = √5·5 = 11.18034.
        let tau = [3.0f32, 4.0, 6.0, 8.0];
        let (u, sv) = factors(&tau, 2, 2, 1).unwrap();
        let s = (sv[0] * sv[0] + sv[1] * sv[1]).sqrt();
        assert!((s - 5.0 * 5f32.sqrt()).abs() < 1e-4, "{s}");
        for i in 0..2 {
            for j in 0..2 {
                let got = u[i] * sv[j];
                assert!((got - tau[i * 2 + j]).abs() < 1e-5, "({i},{j}) {got}");
            }
        }
    }

    #[test]
    fn truncation_error_is_the_dropped_singular_values() {
        // Eckart–Young: the best rank-1 approximation of diag(3, 2, 1)
        // leaves Frobenius error √(2² + 1²) = √5.
        let tau = [3.0f32, 0.0, 0.0, 0.0, 2.0, 0.0, 0.0, 0.0, 1.0];
        let (u, sv) = factors(&tau, 3, 3, 1).unwrap();
        let mut err = 0f32;
        for i in 0..3 {
            for j in 0..3 {
                let d = tau[i * 3 + j] - u[i] * sv[j];
                err += d * d;
            }
        }
        assert!((err.sqrt() - 5f32.sqrt()).abs() < 1e-5, "{}", err.sqrt());
    }

    #[test]
    fn mix_weights_each_component() {
        // Two components: u = I (2×2), sv = [[1, 0], [0, 1]] (so the
        // components are e1 e1ᵀ and e2 e2ᵀ); r = (2, −1) maps x = (3, 5) to
        // (2·3, −1·5) = (6, −5).
        let dev = Device::Cpu;
        let eye = Tensor::new(&[[1f32, 0.0], [0.0, 1.0]], &dev).unwrap();
        let x = Tensor::new(&[[3f32, 5.0]], &dev).unwrap();
        let r = Tensor::new(&[[[2f32, -1.0]]], &dev).unwrap();
        let y = mix(&x, (1, 1), &eye, &eye, &r).unwrap();
        assert_eq!(y.to_vec3::<f32>().unwrap(), vec![vec![vec![6.0, -5.0]]]);
    }
}
