//! Loading a servable model from a folder, whatever it holds: a plain
//! checkpoint (through the runtime) or a routed ensemble saved by
//! [`crate::moe::MoeModel::save`] (its config.json has a `fusion_moe`
//! object). The one place above the runtime that tells the two apart
//! ([`folder_kind`]).

use std::path::{Path, PathBuf};

use runtime::checkpoint::Checkpoint;
use runtime::generate::TextModel;
use runtime::model::{Model, ModelConfig, ModelOptions};

use crate::error::{MergeError, Result};
use crate::moe::{is_moe_folder, MoeModel};

/// What a checkpoint folder holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FolderKind {
    /// One weight set (a fine-tuned model, a merge).
    Plain,
    /// A routed ensemble saved by [`crate::moe::MoeModel::save`].
    Routed,
}

/// What `dir` holds; a folder without a readable config.json counts as
/// plain (loading it reports the real problem).
pub fn folder_kind(dir: &Path) -> Result<FolderKind> {
    Ok(if is_moe_folder(dir)? {
        FolderKind::Routed
    } else {
        FolderKind::Plain
    })
}

/// A model ready to serve, with what it holds in memory.
pub struct Servable {
    /// The runnable model.
    pub model: Model,
    /// Bytes of its tensors in memory (what a cache weighs): the weights of
    /// a plain model; the backbone, experts and routers of a routed
    /// ensemble.
    pub resident_bytes: u64,
    /// The folder its tokenizer, chat template and generation config come
    /// from.
    pub side_files: PathBuf,
}

impl Servable {
    /// A plain model, every weight in the model's dtype.
    pub fn plain(model: Model, side_files: PathBuf) -> Self {
        let resident_bytes =
            (model.config().num_parameters() * model.dtype().size_in_bytes()) as u64;
        Servable {
            model,
            resident_bytes,
            side_files,
        }
    }

    /// A built (or loaded) routed ensemble; its side files are the base's
    /// (or the saved folder's copies of them).
    pub fn routed(built: MoeModel) -> Result<Self> {
        let side_files = built.parts().side_files.clone().ok_or_else(|| {
            MergeError::Spec("a routed ensemble without a tokenizer folder".into())
        })?;
        Ok(Servable {
            resident_bytes: built.bytes(),
            model: built.into_model(),
            side_files,
        })
    }

    /// The model with its folder's tokenizer files: ready to generate,
    /// score and embed.
    pub fn into_text_model(self) -> Result<TextModel> {
        Ok(TextModel::from_model(self.model, &self.side_files)?)
    }
}

/// Loads the model a folder holds: a saved routed ensemble as the ensemble,
/// anything else as a plain checkpoint.
pub fn load_model(dir: &Path, opts: &ModelOptions) -> Result<Model> {
    match folder_kind(dir)? {
        FolderKind::Routed => Ok(MoeModel::load(dir, opts)?.into_model()),
        FolderKind::Plain => Ok(Model::load(dir, opts)?),
    }
}

/// [`load_model`] with the folder's tokenizer files: a model ready to
/// generate, score and embed.
pub fn load_text_model(dir: &Path, opts: &ModelOptions) -> Result<TextModel> {
    Ok(TextModel::from_model(load_model(dir, opts)?, dir)?)
}

/// The model an opened checkpoint holds, weighed by its resident bytes: a
/// saved routed ensemble read from its folder, anything else from the
/// checkpoint's own tensors (the reads it already holds open).
pub fn load_checkpoint(ck: &Checkpoint, opts: &ModelOptions) -> Result<Servable> {
    let dir = ck.dir();
    match folder_kind(dir)? {
        FolderKind::Routed => Servable::routed(MoeModel::load(dir, opts)?),
        FolderKind::Plain => {
            let config = ModelConfig::from_dir(dir)?;
            let model = Model::from_checkpoint(config, ck, opts)?;
            Ok(Servable::plain(model, dir.to_path_buf()))
        }
    }
}
