//! TODO(session): being written.
use super::{MergeMethod, Params};
use crate::error::{MergeError, Result};

pub fn build_fusionbench(_p: &mut Params) -> Result<Box<dyn MergeMethod>> {
    Err(MergeError::Spec("not yet written".into()))
}
pub fn build_mergekit(_p: &mut Params) -> Result<Box<dyn MergeMethod>> {
    Err(MergeError::Spec("not yet written".into()))
}
