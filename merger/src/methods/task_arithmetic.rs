//! TODO(session): being written.
use super::{MergeMethod, Params};
use crate::error::{MergeError, Result};

pub fn build(_p: &mut Params) -> Result<Box<dyn MergeMethod>> {
    Err(MergeError::Spec("not yet written".into()))
}
