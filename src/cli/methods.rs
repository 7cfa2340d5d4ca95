//! `fusion methods`: the method registry as a table.

use merger::methods::{Arity, REGISTRY};

/// Prints every method with its convention and input requirements.
pub fn run() -> anyhow::Result<()> {
    println!(
        "{:<18} {:<12} {:<10} {:<6} {:<7}",
        "method", "convention", "models", "base", "seeded"
    );
    for m in REGISTRY {
        let models = match m.arity {
            Arity::Exactly(k) => format!("{k}"),
            Arity::AtLeast(k) => format!("{k}+"),
        };
        println!(
            "{:<18} {:<12} {:<10} {:<6} {:<7}",
            m.name,
            m.convention,
            models,
            if m.needs_base { "yes" } else { "no" },
            if m.random { "yes" } else { "no" }
        );
    }
    println!("\nParameters and defaults: see the README's method table.");
    Ok(())
}
