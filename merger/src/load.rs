//! Loading a servable model from a folder, whatever it holds: a plain
//! checkpoint (through the runtime) or a routed ensemble saved by
//! [`crate::moe::MoeModel::save`] (its config.json has a `fusion_moe`
//! object). The one place above the runtime that tells the two apart
//! ([`folder_kind`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use std::collections::HashMap;

use candle_core::Tensor;
use runtime::architectures::{self, Kind};
use runtime::checkpoint::Checkpoint;
use runtime::encoder::{Backbone, Encoder, EncoderConfig, SentenceEncoder};
use runtime::generate::TextModel;
use runtime::model::{Model, ModelConfig, ModelOptions};
use runtime::onnx::OnnxEncoder;
use runtime::vision::{ClipVision, ImageEncoder, VisionConfig};
use runtime::{Runnable, RuntimeError};

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

/// The network of a servable model.
pub enum Network {
    /// A decoder (plain, or the backbone of a routed ensemble).
    Decoder(Model),
    /// A sentence encoder (BERT, on candle or an ONNX graph).
    Encoder(Backbone),
    /// A CLIP vision tower.
    Vision(ClipVision),
}

/// A model ready to serve, with what it holds in memory.
pub struct Servable {
    /// The runnable network.
    pub network: Network,
    /// Bytes of its tensors in memory (what a cache weighs): the weights of
    /// a plain model; the backbone, experts and routers of a routed
    /// ensemble.
    pub resident_bytes: u64,
    /// The folder its tokenizer, chat template, generation config and
    /// sentence-transformers files come from.
    pub side_files: PathBuf,
}

impl Servable {
    /// A plain decoder, every weight in the model's dtype.
    pub fn plain(model: Model, side_files: PathBuf) -> Self {
        let resident_bytes =
            (model.config().num_parameters() * model.dtype().size_in_bytes()) as u64;
        Servable {
            network: Network::Decoder(model),
            resident_bytes,
            side_files,
        }
    }

    /// A decoder held as a delta over its base's weights (see
    /// [`crate::residency`]): it weighs the base and the delta.
    pub fn held(model: Model, base_bytes: u64, side_files: PathBuf) -> Self {
        let delta_bytes = model.delta().map_or(0, |d| d.own_bytes());
        Servable {
            network: Network::Decoder(model),
            resident_bytes: base_bytes + delta_bytes,
            side_files,
        }
    }

    /// An encoder, every weight in the model's dtype.
    pub fn encoder(encoder: impl Into<Backbone>, side_files: PathBuf) -> Self {
        let encoder = encoder.into();
        Servable {
            resident_bytes: encoder.resident_bytes(),
            network: Network::Encoder(encoder),
            side_files,
        }
    }

    /// A vision tower, every weight in the model's dtype.
    pub fn vision(tower: ClipVision, side_files: PathBuf) -> Self {
        Servable {
            resident_bytes: tower.resident_bytes(),
            network: Network::Vision(tower),
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
            network: Network::Decoder(built.into_model()),
            side_files,
        })
    }

    /// The decoder, when the network is one.
    pub fn decoder(&self) -> Option<&Model> {
        match &self.network {
            Network::Decoder(m) => Some(m),
            Network::Encoder(_) | Network::Vision(_) => None,
        }
    }

    /// The model with its folder's side files: ready to generate, score
    /// and embed (a decoder) or to embed (an encoder).
    pub fn into_runnable(self) -> Result<Runnable> {
        Ok(match self.network {
            Network::Decoder(m) => {
                Runnable::Text(Arc::new(TextModel::from_model(m, &self.side_files)?))
            }
            Network::Encoder(e) => {
                Runnable::Embedding(SentenceEncoder::from_encoder(e, &self.side_files)?)
            }
            Network::Vision(v) => Runnable::Vision(ImageEncoder::from_tower(v, &self.side_files)?),
        })
    }

    /// [`Servable::into_runnable`] of a decoder; an encoder is a
    /// [`RuntimeError::WrongKind`] error.
    pub fn into_text_model(self) -> Result<TextModel> {
        match self.network {
            Network::Decoder(m) => Ok(TextModel::from_model(m, &self.side_files)?),
            Network::Encoder(_) => Err(RuntimeError::WrongKind(
                "generation and scoring need a text-generation model; this is an embedding model"
                    .into(),
            )
            .into()),
            Network::Vision(_) => Err(RuntimeError::WrongKind(
                "generation and scoring need a text-generation model; this is an image model"
                    .into(),
            )
            .into()),
        }
    }
}

/// A plain model built from tensors by Hugging Face name (a merge's
/// result), with the architecture of `reference` (the merge's base, or its
/// first model, as the merge opened it) and its side files.
pub fn from_tensors(
    tensors: HashMap<String, Tensor>,
    reference: &Checkpoint,
    opts: &ModelOptions,
) -> Result<Servable> {
    let dir = reference.dir();
    Ok(match architectures::of_dir(dir)?.kind {
        Kind::Decoder => {
            let config = ModelConfig::from_dir(dir)?;
            Servable::plain(
                Model::from_tensors(config, tensors, opts)?,
                dir.to_path_buf(),
            )
        }
        Kind::Encoder => {
            let config = EncoderConfig::from_dir(dir)?;
            match reference.onnx() {
                // An ONNX base: the merged tensors replace the initializers
                // of its graph (the version the merge read); the graph runs
                // in ONNX Runtime.
                Some(model) => Servable::encoder(
                    OnnxEncoder::with_weights(model.clone(), config, &tensors)?,
                    dir.to_path_buf(),
                ),
                None => Servable::encoder(
                    Encoder::from_tensors(config, tensors, opts)?,
                    dir.to_path_buf(),
                ),
            }
        }
        Kind::Vision => Servable::vision(
            ClipVision::from_tensors(VisionConfig::from_dir(dir)?, tensors, opts)?,
            dir.to_path_buf(),
        ),
    })
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

/// Whatever a folder holds, ready to run: a routed ensemble or a plain
/// decoder as a text model, an encoder as a sentence encoder.
pub fn load_runnable(dir: &Path, opts: &ModelOptions) -> Result<Runnable> {
    match folder_kind(dir)? {
        FolderKind::Routed => Ok(Runnable::Text(Arc::new(load_text_model(dir, opts)?))),
        FolderKind::Plain => Ok(Runnable::load(dir, opts)?),
    }
}

/// The model an opened checkpoint holds, weighed by its resident bytes: a
/// saved routed ensemble read from its folder, anything else from the
/// checkpoint's own tensors (the reads it already holds open).
pub fn load_checkpoint(ck: &Checkpoint, opts: &ModelOptions) -> Result<Servable> {
    let dir = ck.dir();
    match folder_kind(dir)? {
        FolderKind::Routed => Servable::routed(MoeModel::load(dir, opts)?),
        FolderKind::Plain => match architectures::of_dir(dir)?.kind {
            Kind::Decoder => {
                let config = ModelConfig::from_dir(dir)?;
                let model = Model::from_checkpoint(config, ck, opts)?;
                Ok(Servable::plain(model, dir.to_path_buf()))
            }
            Kind::Encoder => {
                let config = EncoderConfig::from_dir(dir)?;
                Ok(match ck.onnx() {
                    Some(model) => Servable::encoder(
                        OnnxEncoder::with_weights(model.clone(), config, &HashMap::new())?,
                        dir.to_path_buf(),
                    ),
                    None => Servable::encoder(
                        Encoder::from_checkpoint(config, ck, opts)?,
                        dir.to_path_buf(),
                    ),
                })
            }
            Kind::Vision => Ok(Servable::vision(
                ClipVision::from_checkpoint(VisionConfig::from_dir(dir)?, ck, opts)?,
                dir.to_path_buf(),
            )),
        },
    }
}
