//! What `fusion serve` knows of the demo pool: when the configuration names
//! no pool it serves the one `fusion zoo build` wrote (its `pool.yaml` and
//! task pool), and when it has no evaluations it schedules the demo ones:
//! the base, task arithmetic and TIES merging of every expert, scored on
//! the demo task pool, a first time shortly after the start and then every
//! ten minutes. The gateway library knows no demo pool.

use std::path::{Path, PathBuf};
use std::time::Duration;

use evaluator::pool::{PoolFile, POOL_FILE};
use gateway::config::{Config, EvaluationConfig, PoolConfig};
use gateway::GatewayError;

/// Period of the demo evaluations.
pub const DEMO_EVERY: Duration = Duration::from_secs(600);
/// Wait before their first run.
pub const DEMO_DELAY: Duration = Duration::from_secs(5);
/// Examples per task.
pub const DEMO_LIMIT: usize = 20;

/// Adds the demo pool of `dir` (its `pool.yaml`, written by `fusion zoo
/// build`) and its task pool to `config`; the routed merges of the pool
/// train on that task pool's inputs.
pub fn add_demo_pool(config: &mut Config, dir: &Path) -> anyhow::Result<()> {
    let path = dir.join(POOL_FILE);
    let origin = path.display().to_string();
    let pool = PoolFile::read(&path)?;
    if config.pools.contains_key(&pool.name) {
        return Err(GatewayError::Config {
            origin,
            reason: format!("pool `{}` is configured already", pool.name),
        }
        .into());
    }
    let fix = |p: PathBuf| if p.is_relative() { dir.join(p) } else { p };
    let mut pool_config = PoolConfig {
        base: fix(pool.base),
        experts: pool
            .experts
            .into_iter()
            .map(|(name, p)| (name, fix(p)))
            .collect(),
        calibration: None,
    };
    if let Some(tasks) = pool.taskpool.map(fix) {
        config.taskpools.entry(pool.name.clone()).or_insert(tasks);
        // Routed merges of the demo pool train on its tasks' inputs.
        pool_config.calibration = Some(pool.name.clone());
    }
    config.pools.insert(pool.name, pool_config);
    config.validate(&origin)?;
    Ok(())
}

/// The demo schedule for pool `pool` and its task pool (the `taskpools`
/// entry of the same name, which [`add_demo_pool`] adds). Empty when the
/// pool has no task pool.
pub fn demo_evaluations(config: &Config, pool: &str) -> Vec<EvaluationConfig> {
    let (Some(p), true) = (config.pools.get(pool), config.taskpools.contains_key(pool)) else {
        return Vec::new();
    };
    let experts: Vec<&str> = p.experts.keys().map(String::as_str).collect();
    let mut merges = vec![("base".to_string(), format!("{pool}/base"))];
    if !experts.is_empty() {
        let all = experts.join(",");
        merges.push((
            "task_arithmetic".to_string(),
            format!("task_arithmetic({all};scaling_coefficient=0.3)"),
        ));
        merges.push((
            "ties_merging".to_string(),
            format!("ties_merging({all};density=0.2,scaling_coefficient=0.5)"),
        ));
    }
    merges
        .into_iter()
        .map(|(name, merge)| EvaluationConfig {
            name: Some(name),
            merge,
            taskpool: pool.to_string(),
            tasks: Vec::new(),
            every: DEMO_EVERY,
            delay: DEMO_DELAY,
            limit: Some(DEMO_LIMIT),
            min_score: None,
            fail_readiness: false,
        })
        .collect()
}

/// Adds the demo schedule to `config` when it has no evaluations (what
/// `fusion serve` does after [`add_demo_pool`]).
pub fn add_demo_evaluations(config: &mut Config, pool: &str) -> anyhow::Result<()> {
    if config.evaluations.is_empty() {
        config.evaluations = demo_evaluations(config, pool);
        config.validate("the demo evaluations")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn empty_config() -> Config {
        Config::from_yaml("pools: {}\n", "t.yaml", Path::new("/"), Vec::new()).unwrap()
    }

    #[test]
    fn demo_pool_is_added() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("pool.yaml"),
            "name: demo\nbase: models/base\nexperts: {math: models/math}\ntaskpool: tasks\n",
        )
        .unwrap();
        let mut c = empty_config();
        add_demo_pool(&mut c, dir.path()).unwrap();
        assert_eq!(c.pools["demo"].base, dir.path().join("models/base"));
        assert_eq!(
            c.pools["demo"].experts["math"],
            dir.path().join("models/math")
        );
        assert_eq!(c.taskpools["demo"], dir.path().join("tasks"));
        // Its routed merges train on its tasks.
        assert_eq!(c.pools["demo"].calibration.as_deref(), Some("demo"));
        assert_eq!(
            c.calibration_of("demo"),
            Some(("demo".to_string(), dir.path().join("tasks"), true))
        );
        assert!(add_demo_pool(&mut c, dir.path()).is_err(), "added twice");
    }

    #[test]
    fn demo_schedule_covers_base_and_two_merges() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("pool.yaml"),
            "name: demo\nbase: models/base\nexperts: {sum: models/sum, rev: models/rev}\ntaskpool: tasks\n",
        )
        .unwrap();
        let mut c = Config::from_yaml("", "t.yaml", Path::new("/"), Vec::new()).unwrap();
        add_demo_pool(&mut c, dir.path()).unwrap();
        add_demo_evaluations(&mut c, "demo").unwrap();
        let got: Vec<(&str, &str)> = c
            .evaluations
            .iter()
            .map(|e| (e.display_name(), e.merge.as_str()))
            .collect();
        assert_eq!(
            got,
            vec![
                ("base", "demo/base"),
                (
                    "task_arithmetic",
                    "task_arithmetic(rev,sum;scaling_coefficient=0.3)"
                ),
                (
                    "ties_merging",
                    "ties_merging(rev,sum;density=0.2,scaling_coefficient=0.5)"
                ),
            ]
        );
        for e in &c.evaluations {
            assert_eq!(e.taskpool, "demo");
            assert_eq!(e.every, DEMO_EVERY);
            assert_eq!(e.limit, Some(DEMO_LIMIT));
            assert!(
                e.delay < Duration::from_secs(60),
                "first run within a minute"
            );
            // Every merge string parses.
            merger::spec::compact::parse(&e.merge).unwrap();
        }
        // A configuration with evaluations keeps them.
        let before = c.evaluations.len();
        c.evaluations.truncate(1);
        add_demo_evaluations(&mut c, "demo").unwrap();
        assert_eq!(c.evaluations.len(), 1);
        assert!(before > 1);
    }
}
