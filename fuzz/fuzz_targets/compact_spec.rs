//! The compact merge string of the OpenAI `model` field: any input parses
//! or gives an error (never a panic); a parsed merge validates against the
//! method registry or gives an error, and its canonical form and id are
//! computed; a spec written back with `to_compact` parses again.
#![no_main]

use libfuzzer_sys::fuzz_target;
use merger::spec::compact::{parse, to_compact, Parsed};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(Parsed::Merge(spec)) = parse(text) {
        if let Ok(plan) = merger::plan::Plan::new(*spec.clone()) {
            let _ = plan.info().merge_id(plan.spec(), &[]);
        }
        let again = to_compact(&spec);
        let _ = parse(&again);
    }
});
