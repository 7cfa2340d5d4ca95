//! Loading a servable model from a folder, whatever it holds: a plain
//! checkpoint (through the runtime) or a routed ensemble saved by
//! [`crate::moe::MoeModel::save`] (its config.json has a `fusion_moe`
//! object). The one place above the runtime that tells the two apart.

use std::path::Path;

use runtime::generate::TextModel;
use runtime::model::{Model, ModelOptions};

use crate::error::Result;
use crate::moe::{is_moe_folder, MoeModel};

/// Loads the model a folder holds: a saved routed ensemble as the ensemble,
/// anything else as a plain checkpoint.
pub fn load_model(dir: &Path, opts: &ModelOptions) -> Result<Model> {
    if is_moe_folder(dir)? {
        return Ok(MoeModel::load(dir, opts)?.into_model());
    }
    Ok(Model::load(dir, opts)?)
}

/// [`load_model`] with the folder's tokenizer files: a model ready to
/// generate, score and embed.
pub fn load_text_model(dir: &Path, opts: &ModelOptions) -> Result<TextModel> {
    Ok(TextModel::from_model(load_model(dir, opts)?, dir)?)
}
