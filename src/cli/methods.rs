//! `fusion methods`: the method registry as a table.

use merger::methods::{Arity, BaseUse, REGISTRY};

/// Prints every method with its convention and input requirements.
pub fn run() -> anyhow::Result<()> {
    println!(
        "{:<18} {:<12} {:<10} {:<8} {:<7}",
        "method", "convention", "models", "base", "seeded"
    );
    for m in REGISTRY {
        let models = match m.arity {
            Arity::Exactly(k) => format!("{k}"),
            Arity::AtLeast(k) => format!("{k}+"),
        };
        println!(
            "{:<18} {:<12} {:<10} {:<8} {:<7}",
            m.name,
            m.convention,
            models,
            match m.base {
                BaseUse::Required => "yes",
                BaseUse::Optional => "optional",
                BaseUse::Unused => "no",
            },
            if m.random { "yes" } else { "no" }
        );
    }
    println!(
        "\nwe_moe, sparse_we_moe and rankone_moe build routed ensembles (fusion merge --calibration DIR)."
    );
    println!("Parameters and defaults: see the README's method table.");
    Ok(())
}
