//! The mergekit YAML reader: any text gives a spec or an error (never a
//! panic, never unbounded work); a spec validates or gives an error.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(spec) = merger::mergekit::from_yaml(text, Path::new("fuzz.yaml")) {
        if let Ok(plan) = merger::plan::Plan::new(spec.clone()) {
            let _ = plan.info().merge_id(plan.spec(), &[]);
        }
    }
});
