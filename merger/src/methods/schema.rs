//! Method parameters as data: every method declares the parameters it takes
//! ([`Param`]: name, aliases, type, default, allowed range, the work it
//! scales, a one-line doc) in a static list referenced from its
//! [`super::MethodInfo`]. Validation reads the declaration ([`super::Params`]
//! takes a `&Param`, not a name and a default, and refuses one the method
//! did not declare); `fusion methods` and the README's method table print
//! the same lists ([`super::catalog`]).

use crate::spec::Dialect;
use crate::work::Work;

/// Where a parameter is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// In the spec's parameters (`;density=0.2`, `parameters:`).
    Global,
    /// On each model (mergekit's `models[i].parameters`), or once in the
    /// spec's parameters for every model.
    PerModel,
}

/// The type of a parameter's value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Type {
    /// A number that may vary per tensor: a scalar, a gradient list or a
    /// filter list.
    Number,
    /// One number.
    Scalar,
    /// One non-negative integer.
    Integer,
    /// `true` or `false`.
    Bool,
    /// One word of the list.
    Choice(&'static [&'static str]),
    /// A list of tensor names or `*` patterns.
    Names,
    /// The name of a registered checkpoint.
    Checkpoint,
    /// The name of one of the merge's models (a per-task view's task).
    Expert,
}

impl Type {
    /// The type as written in `fusion methods` and the README.
    pub fn describe(self) -> String {
        match self {
            Type::Number => "number (per tensor)".into(),
            Type::Scalar => "number".into(),
            Type::Integer => "integer".into(),
            Type::Bool => "bool".into(),
            Type::Choice(options) => options.join(" | "),
            Type::Names => "list of names".into(),
            Type::Checkpoint => "checkpoint".into(),
            Type::Expert => "model name".into(),
        }
    }

    /// A short machine name (`fusion methods --json`).
    pub fn key(self) -> &'static str {
        match self {
            Type::Number => "number",
            Type::Scalar => "scalar",
            Type::Integer => "integer",
            Type::Bool => "bool",
            Type::Choice(_) => "choice",
            Type::Names => "names",
            Type::Checkpoint => "checkpoint",
            Type::Expert => "expert",
        }
    }
}

/// A parameter's value when the spec does not give it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum DefaultValue {
    /// A number.
    Number(f64),
    /// A number that depends on the spec's naming convention (FusionBench
    /// specs and mergekit YAML disagree on some defaults).
    ByDialect {
        /// In compact specs and FusionBench YAML.
        fusionbench: f64,
        /// In mergekit YAML.
        mergekit: f64,
    },
    /// A boolean.
    Bool(bool),
    /// One of the choices.
    Word(&'static str),
    /// An empty list.
    Empty,
    /// No value: leaving it out means what the doc says (another parameter
    /// decides, or the feature is off).
    Unset,
    /// Computed from other parameters, as the text says.
    Depends(&'static str),
}

impl DefaultValue {
    /// The numeric default for `dialect`, if there is one.
    pub fn number(self, dialect: Dialect) -> Option<f64> {
        match self {
            DefaultValue::Number(x) => Some(x),
            DefaultValue::ByDialect {
                fusionbench,
                mergekit,
            } => Some(match dialect {
                Dialect::Fusionbench => fusionbench,
                Dialect::Mergekit => mergekit,
            }),
            _ => None,
        }
    }

    /// The default as written in `fusion methods` and the README.
    pub fn describe(self) -> String {
        match self {
            DefaultValue::Number(x) => fmt_number(x),
            DefaultValue::ByDialect {
                fusionbench,
                mergekit,
            } => format!(
                "{} ({} in mergekit YAML)",
                fmt_number(fusionbench),
                fmt_number(mergekit)
            ),
            DefaultValue::Bool(b) => b.to_string(),
            DefaultValue::Word(w) => w.to_string(),
            DefaultValue::Empty => "none".into(),
            DefaultValue::Unset => "–".into(),
            DefaultValue::Depends(text) => text.to_string(),
        }
    }
}

/// One end of a [`Range`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Limit {
    /// No limit on this side.
    Open,
    /// The value itself is allowed.
    Inclusive(f64),
    /// Only values strictly beyond it.
    Exclusive(f64),
}

/// The values a numeric parameter may take (every number is also finite).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Range {
    /// The lower end.
    pub min: Limit,
    /// The upper end.
    pub max: Limit,
}

impl Range {
    /// Any finite number.
    pub const ANY: Range = Range {
        min: Limit::Open,
        max: Limit::Open,
    };
    /// [0, 1].
    pub const UNIT: Range = Range::new(Limit::Inclusive(0.0), Limit::Inclusive(1.0));
    /// [0, 1).
    pub const UNIT_OPEN_ABOVE: Range = Range::new(Limit::Inclusive(0.0), Limit::Exclusive(1.0));
    /// (0, 1].
    pub const UNIT_OPEN_BELOW: Range = Range::new(Limit::Exclusive(0.0), Limit::Inclusive(1.0));
    /// > 0.
    pub const POSITIVE: Range = Range::new(Limit::Exclusive(0.0), Limit::Open);
    /// ≥ 0.
    pub const NON_NEGATIVE: Range = Range::new(Limit::Inclusive(0.0), Limit::Open);

    /// A range from its two ends.
    pub const fn new(min: Limit, max: Limit) -> Range {
        Range { min, max }
    }

    /// At least `min` (for integers: `Range::at_least(1.0)`).
    pub const fn at_least(min: f64) -> Range {
        Range::new(Limit::Inclusive(min), Limit::Open)
    }

    /// Whether `x` is allowed (never for NaN or an infinity).
    pub fn contains(&self, x: f64) -> bool {
        x.is_finite()
            && match self.min {
                Limit::Open => true,
                Limit::Inclusive(a) => x >= a,
                Limit::Exclusive(a) => x > a,
            }
            && match self.max {
                Limit::Open => true,
                Limit::Inclusive(b) => x <= b,
                Limit::Exclusive(b) => x < b,
            }
    }

    /// The range as written in errors, `fusion methods` and the README:
    /// `in (0, 1]`, `> 0`, `≥ 1`, `finite`.
    pub fn describe(&self) -> String {
        match (self.min, self.max) {
            (Limit::Open, Limit::Open) => "finite".into(),
            (Limit::Inclusive(a), Limit::Open) => format!("≥ {}", fmt_number(a)),
            (Limit::Exclusive(a), Limit::Open) => format!("> {}", fmt_number(a)),
            (Limit::Open, Limit::Inclusive(b)) => format!("≤ {}", fmt_number(b)),
            (Limit::Open, Limit::Exclusive(b)) => format!("< {}", fmt_number(b)),
            (min, max) => {
                let (open, a) = match min {
                    Limit::Inclusive(a) => ('[', a),
                    Limit::Exclusive(a) => ('(', a),
                    Limit::Open => unreachable!(),
                };
                let (close, b) = match max {
                    Limit::Inclusive(b) => (']', b),
                    Limit::Exclusive(b) => (')', b),
                    Limit::Open => unreachable!(),
                };
                format!("in {open}{}, {}{close}", fmt_number(a), fmt_number(b))
            }
        }
    }

    /// A value inside the range (the tests set every parameter to one).
    pub fn sample(&self) -> f64 {
        match (self.min, self.max) {
            (Limit::Inclusive(a), _) => a,
            (_, Limit::Inclusive(b)) => b,
            (Limit::Exclusive(a), Limit::Exclusive(b)) => (a + b) / 2.0,
            (Limit::Exclusive(a), Limit::Open) => a + 1.0,
            (Limit::Open, Limit::Exclusive(b)) => b - 1.0,
            (Limit::Open, Limit::Open) => 1.0,
        }
    }
}

/// One declared parameter of a method.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Param {
    /// The name (the first spelling; FusionBench's where the conventions
    /// differ).
    pub name: &'static str,
    /// Other spellings accepted for it (mergekit's, FusionBench's config
    /// names).
    pub aliases: &'static [&'static str],
    /// The type of its value.
    pub ty: Type,
    /// Global or per model.
    pub scope: Scope,
    /// Its value when not given.
    pub default: DefaultValue,
    /// The allowed values of a number (integers: of the integer).
    pub range: Range,
    /// What it scales, when its size is bounded by the configured
    /// [`crate::Bounds`].
    pub work: Option<Work>,
    /// One line on what it does.
    pub doc: &'static str,
}

impl Param {
    /// A global parameter with no range or bound, to be refined with the
    /// builder methods below (`Param::global(..).range(..)`), all `const`.
    pub const fn global(
        name: &'static str,
        ty: Type,
        default: DefaultValue,
        doc: &'static str,
    ) -> Param {
        Param {
            name,
            aliases: &[],
            ty,
            scope: Scope::Global,
            default,
            range: Range::ANY,
            work: None,
            doc,
        }
    }

    /// A per-model numeric parameter.
    pub const fn per_model(name: &'static str, default: f64, doc: &'static str) -> Param {
        Param {
            scope: Scope::PerModel,
            ..Param::global(name, Type::Number, DefaultValue::Number(default), doc)
        }
    }

    /// The same with other accepted spellings.
    pub const fn aliases(self, aliases: &'static [&'static str]) -> Param {
        Param { aliases, ..self }
    }

    /// The same with an allowed range.
    pub const fn range(self, range: Range) -> Param {
        Param { range, ..self }
    }

    /// The same, bounded by the configured bound of `work`.
    pub const fn work(self, work: Work) -> Param {
        Param {
            work: Some(work),
            ..self
        }
    }

    /// Every spelling: the name, then the aliases.
    pub fn keys(&self) -> impl Iterator<Item = &'static str> + '_ {
        std::iter::once(self.name).chain(self.aliases.iter().copied())
    }

    /// The allowed values, as written in `fusion methods` (with the bound
    /// of a work parameter).
    pub fn describe_range(&self) -> String {
        let mut text = match self.ty {
            Type::Number | Type::Scalar => self.range.describe(),
            Type::Integer if self.range == Range::NON_NEGATIVE => "integer ≥ 0".into(),
            Type::Integer => format!("integer {}", self.range.describe()),
            Type::Bool | Type::Choice(_) | Type::Names | Type::Checkpoint | Type::Expert => {
                "–".into()
            }
        };
        if let Some(work) = self.work {
            text.push_str(&format!(", bounded ({})", work.unit()));
        }
        text
    }
}

/// A number as the docs write it: `0.3`, `1`, `1e-5`.
pub fn fmt_number(x: f64) -> String {
    if x != 0.0 && (x.abs() < 1e-3 || x.abs() >= 1e6) {
        let s = format!("{x:e}");
        s.replace("e-0", "e-")
    } else {
        format!("{x}")
    }
}

/// Parameters several methods declare alike.
pub mod common {
    use super::*;

    /// mergekit's `int8_mask`: accepted, no effect on the result.
    pub static INT8_MASK: Param = Param::global(
        "int8_mask",
        Type::Bool,
        DefaultValue::Bool(false),
        "mergekit's mask dtype; accepted, no effect on the result",
    );

    /// The per-model weight wi.
    pub static WEIGHT: Param = Param::per_model("weight", 1.0, "weight wi of each model");

    /// `exclude_keys` of the matrix methods.
    pub static EXCLUDE_KEYS: Param = Param::global(
        "exclude_keys",
        Type::Names,
        DefaultValue::Empty,
        "tensors (names or `*` patterns) left to the plain mean of the task vectors",
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_describe_and_contain_what_they_say() {
        let cases = [
            (Range::UNIT_OPEN_BELOW, "in (0, 1]", 0.0, false),
            (Range::UNIT_OPEN_BELOW, "in (0, 1]", 1.0, true),
            (Range::UNIT_OPEN_ABOVE, "in [0, 1)", 1.0, false),
            (Range::UNIT_OPEN_ABOVE, "in [0, 1)", 0.0, true),
            (Range::UNIT, "in [0, 1]", 1.0, true),
            (Range::POSITIVE, "> 0", 0.0, false),
            (Range::NON_NEGATIVE, "≥ 0", 0.0, true),
            (Range::at_least(2.0), "≥ 2", 1.0, false),
            (Range::ANY, "finite", -1e300, true),
        ];
        for (range, text, x, inside) in cases {
            assert_eq!(range.describe(), text);
            assert_eq!(range.contains(x), inside, "{text} {x}");
            assert!(range.contains(range.sample()), "{text}");
            assert!(!range.contains(f64::NAN) && !range.contains(f64::INFINITY));
        }
    }

    #[test]
    fn numbers_print_as_the_docs_write_them() {
        assert_eq!(fmt_number(0.3), "0.3");
        assert_eq!(fmt_number(1.0), "1");
        assert_eq!(fmt_number(1e-5), "1e-5");
        assert_eq!(fmt_number(1e-8), "1e-8");
        assert_eq!(fmt_number(0.9995), "0.9995");
        assert_eq!(fmt_number(400.0), "400");
    }

    #[test]
    fn dialect_defaults_resolve() {
        let d = DefaultValue::ByDialect {
            fusionbench: 0.3,
            mergekit: 1.0,
        };
        assert_eq!(d.number(Dialect::Fusionbench), Some(0.3));
        assert_eq!(d.number(Dialect::Mergekit), Some(1.0));
        assert_eq!(DefaultValue::Unset.number(Dialect::Mergekit), None);
    }
}
