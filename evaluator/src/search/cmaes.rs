//! The optimisers of `fusion search`, both minimising over the unit box
//! [0, 1]^n in ask/tell form (a generation is asked for, evaluated, in
//! parallel if need be, and told back): [`Cmaes`] and the [`RandomSearch`]
//! baseline.
//!
//! [`Cmaes`] is the standard (μ/μ_w, λ)-CMA-ES of Hansen's tutorial
//! ("The CMA Evolution Strategy: A Tutorial", arXiv:1604.00772, and its
//! `purecma.py`), the algorithm mergekit-evolve runs through pycma:
//!
//! - sample x_k = m + σ B D z_k, z_k ~ N(0, I), k = 1..λ;
//! - m' = Σ_{i≤μ} w_i x_{i:λ} (the μ best, w_i ∝ ln(μ + ½) − ln i);
//! - p_σ ← (1 − c_σ) p_σ + √(c_σ(2 − c_σ)μ_eff) C^{−½} (m' − m)/σ;
//! - p_c ← (1 − c_c) p_c + h_σ √(c_c(2 − c_c)μ_eff) (m' − m)/σ;
//! - C ← (1 − c_1 − c_μ) C + c_1 (p_c p_cᵀ + (1 − h_σ) c_c(2 − c_c) C)
//!   + c_μ Σ w_i y_i y_iᵀ, y_i = (x_{i:λ} − m)/σ;
//! - σ ← σ exp((c_σ/d_σ)(‖p_σ‖/E‖N(0, I)‖ − 1)),
//!
//! with the tutorial's default constants (λ = 4 + ⌊3 ln n⌋, μ = ⌊λ/2⌋) and
//! B, D from an eigendecomposition of C (cyclic Jacobi; n is small here)
//! renewed every λ/((c_1 + c_μ) n 10) evaluations, as `purecma` does.
//!
//! Bounds: a sample outside the box is reflected back into it (mirrored at
//! each face, so x = 1.2 becomes 0.8), and the reflected point is the one
//! evaluated and told, as the `cmaes` Python library does with its clipped
//! samples. σ is capped at 1, the box's width: past that a generation is
//! no more spread than uniform sampling.
//!
//! Both are deterministic for a seed (ChaCha8).

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;

/// An optimiser in ask/tell form over [0, 1]^n, minimising.
pub trait Optimizer {
    /// The next generation of points to evaluate.
    fn ask(&mut self) -> Vec<Vec<f64>>;
    /// The values at the points of the last [`Optimizer::ask`], in order
    /// (lower is better).
    fn tell(&mut self, points: &[Vec<f64>], values: &[f64]);
}

/// The default population size λ = 4 + ⌊3 ln n⌋ of Hansen's tutorial.
pub fn default_population(n: usize) -> usize {
    4 + (3.0 * (n.max(1) as f64).ln()).floor() as usize
}

/// Settings of [`Cmaes`].
#[derive(Debug, Clone, PartialEq)]
pub struct CmaesOptions {
    /// The initial mean, in [0, 1]^n.
    pub mean: Vec<f64>,
    /// The initial step size σ (in units of the box's width).
    pub sigma: f64,
    /// The population size λ (at least 2).
    pub population: usize,
    /// Seed of the sampler.
    pub seed: u64,
}

/// The (μ/μ_w, λ)-CMA-ES (see the module docs).
#[derive(Debug, Clone)]
pub struct Cmaes {
    n: usize,
    lambda: usize,
    weights: Vec<f64>,
    mueff: f64,
    cc: f64,
    cs: f64,
    c1: f64,
    cmu: f64,
    damps: f64,
    chin: f64,
    mean: Vec<f64>,
    sigma: f64,
    pc: Vec<f64>,
    ps: Vec<f64>,
    /// The covariance matrix, row-major n × n.
    c: Vec<f64>,
    /// Its eigenvectors (columns of B, row-major) and the square roots of
    /// its eigenvalues.
    b: Vec<f64>,
    d: Vec<f64>,
    counteval: usize,
    eigeneval: usize,
    rng: ChaCha8Rng,
}

impl Cmaes {
    /// A fresh strategy at `opts.mean` with step `opts.sigma`.
    ///
    /// # Panics
    /// When the mean is empty, σ is not positive or λ < 2 (the search
    /// config is validated before this is built).
    pub fn new(opts: &CmaesOptions) -> Cmaes {
        let n = opts.mean.len();
        assert!(n > 0, "CMA-ES needs at least one dimension");
        assert!(opts.sigma > 0.0 && opts.sigma.is_finite(), "sigma > 0");
        assert!(opts.population >= 2, "population >= 2");
        let lambda = opts.population;
        let mu = lambda / 2;
        let raw: Vec<f64> = (1..=mu)
            .map(|i| (mu as f64 + 0.5).ln() - (i as f64).ln())
            .collect();
        let sum: f64 = raw.iter().sum();
        let weights: Vec<f64> = raw.iter().map(|w| w / sum).collect();
        let mueff = 1.0 / weights.iter().map(|w| w * w).sum::<f64>();
        let nf = n as f64;
        let cc = (4.0 + mueff / nf) / (nf + 4.0 + 2.0 * mueff / nf);
        let cs = (mueff + 2.0) / (nf + mueff + 5.0);
        let c1 = 2.0 / ((nf + 1.3).powi(2) + mueff);
        let cmu = (1.0 - c1).min(2.0 * (mueff - 2.0 + 1.0 / mueff) / ((nf + 2.0).powi(2) + mueff));
        let damps = 1.0 + 2.0 * (((mueff - 1.0) / (nf + 1.0)).sqrt() - 1.0).max(0.0) + cs;
        let chin = nf.sqrt() * (1.0 - 1.0 / (4.0 * nf) + 1.0 / (21.0 * nf * nf));
        let mut identity = vec![0.0; n * n];
        for i in 0..n {
            identity[i * n + i] = 1.0;
        }
        Cmaes {
            n,
            lambda,
            weights,
            mueff,
            cc,
            cs,
            c1,
            cmu,
            damps,
            chin,
            mean: opts.mean.iter().map(|x| reflect(*x)).collect(),
            sigma: opts.sigma.min(1.0),
            pc: vec![0.0; n],
            ps: vec![0.0; n],
            c: identity.clone(),
            b: identity,
            d: vec![1.0; n],
            counteval: 0,
            eigeneval: 0,
            rng: ChaCha8Rng::seed_from_u64(opts.seed),
        }
    }

    /// The population size λ.
    pub fn population(&self) -> usize {
        self.lambda
    }

    /// The current mean.
    pub fn mean(&self) -> &[f64] {
        &self.mean
    }

    /// The current step size σ.
    pub fn sigma(&self) -> f64 {
        self.sigma
    }

    /// C^{−½} v = B D^{−1} Bᵀ v.
    fn inv_sqrt_c(&self, v: &[f64]) -> Vec<f64> {
        let n = self.n;
        let bt_v: Vec<f64> = (0..n)
            .map(|j| (0..n).map(|i| self.b[i * n + j] * v[i]).sum::<f64>() / self.d[j])
            .collect();
        (0..n)
            .map(|i| (0..n).map(|j| self.b[i * n + j] * bt_v[j]).sum())
            .collect()
    }

    /// Renews B and D from C when enough evaluations have passed.
    fn update_eigensystem(&mut self) {
        let n = self.n;
        let every = self.lambda as f64 / ((self.c1 + self.cmu) * n as f64 * 10.0);
        if ((self.counteval - self.eigeneval) as f64) < every {
            return;
        }
        self.eigeneval = self.counteval;
        for i in 0..n {
            for j in 0..i {
                let s = 0.5 * (self.c[i * n + j] + self.c[j * n + i]);
                self.c[i * n + j] = s;
                self.c[j * n + i] = s;
            }
        }
        let (values, vectors) = symmetric_eigen(&self.c, n);
        self.d = values.iter().map(|v| v.max(1e-20).sqrt()).collect();
        self.b = vectors;
    }
}

impl Optimizer for Cmaes {
    fn ask(&mut self) -> Vec<Vec<f64>> {
        let n = self.n;
        (0..self.lambda)
            .map(|_| {
                let z: Vec<f64> = (0..n)
                    .map(|j| self.d[j] * self.rng.sample::<f64, _>(StandardNormal))
                    .collect();
                (0..n)
                    .map(|i| {
                        let step: f64 = (0..n).map(|j| self.b[i * n + j] * z[j]).sum();
                        reflect(self.mean[i] + self.sigma * step)
                    })
                    .collect()
            })
            .collect()
    }

    fn tell(&mut self, points: &[Vec<f64>], values: &[f64]) {
        assert_eq!(points.len(), values.len(), "one value per point");
        assert_eq!(points.len(), self.lambda, "a whole generation");
        let n = self.n;
        self.counteval += points.len();
        let mut order: Vec<usize> = (0..points.len()).collect();
        // NaN sorts last: a failed point never leads.
        order.sort_by(|&a, &b| values[a].total_cmp(&values[b]));
        let old = self.mean.clone();
        let mut mean = vec![0.0; n];
        for (w, &k) in self.weights.iter().zip(&order) {
            for (m, x) in mean.iter_mut().zip(&points[k]) {
                *m += w * x;
            }
        }
        self.mean = mean;
        let yw: Vec<f64> = (0..n)
            .map(|i| (self.mean[i] - old[i]) / self.sigma)
            .collect();
        let z = self.inv_sqrt_c(&yw);
        let a = (self.cs * (2.0 - self.cs) * self.mueff).sqrt();
        for (p, zi) in self.ps.iter_mut().zip(&z) {
            *p = (1.0 - self.cs) * *p + a * zi;
        }
        let ps_norm = norm(&self.ps);
        let generations = self.counteval as f64 / self.lambda as f64;
        let hsig = ps_norm / (1.0 - (1.0 - self.cs).powf(2.0 * generations)).sqrt() / self.chin
            < 1.4 + 2.0 / (n as f64 + 1.0);
        let hsig = if hsig { 1.0 } else { 0.0 };
        let b = (self.cc * (2.0 - self.cc) * self.mueff).sqrt();
        for (p, y) in self.pc.iter_mut().zip(&yw) {
            *p = (1.0 - self.cc) * *p + hsig * b * y;
        }
        let ys: Vec<Vec<f64>> = order
            .iter()
            .take(self.weights.len())
            .map(|&k| {
                (0..n)
                    .map(|i| (points[k][i] - old[i]) / self.sigma)
                    .collect()
            })
            .collect();
        let c1a = self.c1 * (1.0 - (1.0 - hsig) * self.cc * (2.0 - self.cc));
        for i in 0..n {
            for j in 0..n {
                let rank_mu: f64 = self
                    .weights
                    .iter()
                    .zip(&ys)
                    .map(|(w, y)| w * y[i] * y[j])
                    .sum();
                let cij = &mut self.c[i * n + j];
                *cij = (1.0 - c1a - self.cmu) * *cij
                    + self.c1 * self.pc[i] * self.pc[j]
                    + self.cmu * rank_mu;
            }
        }
        self.sigma *= ((self.cs / self.damps) * (ps_norm / self.chin - 1.0)).exp();
        self.sigma = self.sigma.min(1.0);
        self.update_eigensystem();
    }
}

/// Uniform sampling of the box, in generations of a fixed size (so that
/// they can be evaluated in parallel like CMA-ES's).
#[derive(Debug, Clone)]
pub struct RandomSearch {
    n: usize,
    population: usize,
    rng: ChaCha8Rng,
}

impl RandomSearch {
    /// `population` uniform points of [0, 1]^n per generation.
    pub fn new(n: usize, population: usize, seed: u64) -> RandomSearch {
        RandomSearch {
            n,
            population: population.max(1),
            rng: ChaCha8Rng::seed_from_u64(seed),
        }
    }
}

impl Optimizer for RandomSearch {
    fn ask(&mut self) -> Vec<Vec<f64>> {
        (0..self.population)
            .map(|_| (0..self.n).map(|_| self.rng.random::<f64>()).collect())
            .collect()
    }

    fn tell(&mut self, _points: &[Vec<f64>], _values: &[f64]) {}
}

/// Folds x into [0, 1] by mirroring at the faces (period 2).
pub fn reflect(x: f64) -> f64 {
    if !x.is_finite() {
        return 0.5;
    }
    let r = x.rem_euclid(2.0);
    if r > 1.0 {
        2.0 - r
    } else {
        r
    }
}

fn norm(v: &[f64]) -> f64 {
    v.iter().map(|x| x * x).sum::<f64>().sqrt()
}

/// Eigenvalues and eigenvectors (the columns of a row-major n × n matrix)
/// of the symmetric row-major matrix `a`, by cyclic Jacobi rotations.
fn symmetric_eigen(a: &[f64], n: usize) -> (Vec<f64>, Vec<f64>) {
    let mut a = a.to_vec();
    let mut v = vec![0.0; n * n];
    for i in 0..n {
        v[i * n + i] = 1.0;
    }
    let scale: f64 = a.iter().map(|x| x * x).sum::<f64>().max(f64::MIN_POSITIVE);
    for _sweep in 0..100 {
        let off: f64 = (0..n)
            .flat_map(|i| (0..n).filter(move |&j| j != i).map(move |j| (i, j)))
            .map(|(i, j)| a[i * n + j] * a[i * n + j])
            .sum();
        if off <= 1e-30 * scale {
            break;
        }
        for p in 0..n {
            for q in p + 1..n {
                let apq = a[p * n + q];
                if apq == 0.0 {
                    continue;
                }
                let theta = (a[q * n + q] - a[p * n + p]) / (2.0 * apq);
                let sign = if theta >= 0.0 { 1.0 } else { -1.0 };
                let t = sign / (theta.abs() + (theta * theta + 1.0).sqrt());
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                for k in 0..n {
                    let akp = a[k * n + p];
                    let akq = a[k * n + q];
                    a[k * n + p] = c * akp - s * akq;
                    a[k * n + q] = s * akp + c * akq;
                }
                for k in 0..n {
                    let apk = a[p * n + k];
                    let aqk = a[q * n + k];
                    a[p * n + k] = c * apk - s * aqk;
                    a[q * n + k] = s * apk + c * aqk;
                }
                for k in 0..n {
                    let vkp = v[k * n + p];
                    let vkq = v[k * n + q];
                    v[k * n + p] = c * vkp - s * vkq;
                    v[k * n + q] = s * vkp + c * vkq;
                }
            }
        }
    }
    ((0..n).map(|i| a[i * n + i]).collect(), v)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `opt` for `budget` evaluations of `f`; the best value seen.
    fn minimise(opt: &mut dyn Optimizer, f: &dyn Fn(&[f64]) -> f64, budget: usize) -> f64 {
        let mut best = f64::INFINITY;
        let mut used = 0;
        while used < budget {
            let points = opt.ask();
            let values: Vec<f64> = points.iter().map(|p| f(p)).collect();
            used += points.len();
            best = values.iter().copied().fold(best, f64::min);
            opt.tell(&points, &values);
        }
        best
    }

    fn cmaes(n: usize, seed: u64) -> Cmaes {
        Cmaes::new(&CmaesOptions {
            mean: vec![0.5; n],
            sigma: 0.3,
            population: default_population(n),
            seed,
        })
    }

    /// Σ (x_i − 0.3)²: the minimum 0 sits inside the box, off its centre.
    fn sphere(x: &[f64]) -> f64 {
        x.iter().map(|v| (v - 0.3).powi(2)).sum()
    }

    /// Rosenbrock on [−2, 2]^n (its minimum 0 at (1, ..., 1), u = 0.75).
    fn rosenbrock(u: &[f64]) -> f64 {
        let x: Vec<f64> = u.iter().map(|v| -2.0 + 4.0 * v).collect();
        x.windows(2)
            .map(|w| 100.0 * (w[1] - w[0] * w[0]).powi(2) + (1.0 - w[0]).powi(2))
            .sum()
    }

    #[test]
    fn default_population_follows_the_tutorial() {
        assert_eq!(default_population(1), 4);
        assert_eq!(default_population(2), 6);
        assert_eq!(default_population(7), 9);
        assert_eq!(default_population(10), 10);
    }

    #[test]
    fn minimises_the_sphere_to_a_tolerance() {
        for seed in 0..3 {
            let best = minimise(&mut cmaes(5, seed), &sphere, 1500);
            assert!(best < 1e-10, "seed {seed}: {best}");
        }
    }

    #[test]
    fn minimises_rosenbrock_to_a_tolerance() {
        for seed in 0..3 {
            let best = minimise(&mut cmaes(3, seed), &rosenbrock, 6000);
            assert!(best < 1e-8, "seed {seed}: {best}");
        }
    }

    #[test]
    fn finds_an_optimum_on_the_boundary() {
        // min at x = 0 in every coordinate: reflection keeps the samples
        // in the box and the mean walks to the face.
        let f = |x: &[f64]| x.iter().sum::<f64>();
        let best = minimise(&mut cmaes(4, 1), &f, 800);
        assert!(best < 1e-3, "{best}");
    }

    #[test]
    fn beats_random_search_on_the_sphere_with_the_same_budget() {
        for seed in 0..5 {
            let budget = 200;
            let cma = minimise(&mut cmaes(6, seed), &sphere, budget);
            let random = minimise(
                &mut RandomSearch::new(6, default_population(6), seed),
                &sphere,
                budget,
            );
            assert!(
                cma < random / 10.0,
                "seed {seed}: cma {cma}, random {random}"
            );
        }
    }

    #[test]
    fn samples_stay_in_the_box_and_runs_repeat_for_a_seed() {
        let mut a = Cmaes::new(&CmaesOptions {
            mean: vec![0.95, 0.05],
            sigma: 1.0,
            population: 50,
            seed: 9,
        });
        let mut b = a.clone();
        for _ in 0..5 {
            let pa = a.ask();
            assert_eq!(pa, b.ask());
            assert!(pa.iter().flatten().all(|x| (0.0..=1.0).contains(x)));
            let values: Vec<f64> = pa.iter().map(|p| sphere(p)).collect();
            a.tell(&pa, &values);
            b.tell(&pa, &values);
        }
        assert_eq!(a.mean(), b.mean());
        let mut r = RandomSearch::new(3, 4, 1);
        assert_eq!(r.ask().len(), 4);
        assert_ne!(r.ask(), RandomSearch::new(3, 4, 2).ask());
    }

    #[test]
    fn reflection_and_eigen() {
        assert_eq!(reflect(0.25), 0.25);
        assert!((reflect(1.2) - 0.8).abs() < 1e-12);
        assert!((reflect(-0.3) - 0.3).abs() < 1e-12);
        assert!((reflect(2.1) - 0.1).abs() < 1e-12);
        assert_eq!(reflect(f64::NAN), 0.5);
        // [[2, 1], [1, 2]]: eigenvalues 1 and 3.
        let (mut values, v) = symmetric_eigen(&[2.0, 1.0, 1.0, 2.0], 2);
        values.sort_by(f64::total_cmp);
        assert!((values[0] - 1.0).abs() < 1e-12 && (values[1] - 3.0).abs() < 1e-12);
        // The columns are orthonormal.
        let dot = v[0] * v[1] + v[2] * v[3];
        assert!(dot.abs() < 1e-12);
    }
}
