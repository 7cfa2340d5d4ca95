//! `fusion methods`: the method registry with every method's declared
//! parameters, as a table, as JSON (`--json`) or as the README's markdown
//! table (`--markdown`), all printed by [`merger::methods::catalog`].

use clap::Args;
use merger::methods::{catalog, lookup};

/// The arguments of `fusion methods`.
#[derive(Args, Debug)]
pub struct MethodsArgs {
    /// Only these methods (default: all).
    pub names: Vec<String>,
    /// Print JSON: every method with its models, base, seeding and
    /// parameters (name, aliases, type, scope, default, range, bound, doc).
    #[arg(long, conflicts_with = "markdown")]
    pub json: bool,
    /// Print the README's method table (markdown).
    #[arg(long)]
    pub markdown: bool,
}

/// Prints the methods and their parameters.
pub fn run(args: MethodsArgs) -> anyhow::Result<()> {
    for name in &args.names {
        lookup(name)?;
    }
    if args.json {
        let mut all = catalog::json();
        if let Some(list) = all.as_array_mut() {
            list.retain(|m| {
                args.names.is_empty() || args.names.iter().any(|n| m["name"] == n.as_str())
            });
        }
        println!("{}", serde_json::to_string_pretty(&all)?);
    } else if args.markdown {
        anyhow::ensure!(
            args.names.is_empty(),
            "--markdown prints the README's whole table; leave out the method names"
        );
        print!("{}", catalog::markdown());
    } else {
        print!("{}", catalog::text(&args.names));
        println!(
            "\nwe_moe, sparse_we_moe and rankone_moe build routed ensembles (fusion merge --calibration DIR).\n\
             Per-tensor numbers also take a gradient list or filter list (docs/merging.md)."
        );
    }
    Ok(())
}
