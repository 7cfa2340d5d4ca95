//! Task pools, metrics and comparison tables (issue 5). Nothing is implemented here yet.
