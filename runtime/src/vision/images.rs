//! [`ImageEncoder`]: a CLIP vision tower with its folder's image
//! processor: images in, embeddings out (`fusion embed --image`,
//! `/v1/embeddings` with images, the image task pools).

use std::path::Path;

use crate::error::{Result, RuntimeError};
use crate::model::ModelOptions;
use crate::vision::{ClipVision, ImageProcessor, RgbImage, VisionConfig};

/// Images run through the tower per forward pass: bounds the activations
/// (`batch × positions × hidden` per block) whatever the request's size.
pub const IMAGE_BATCH: usize = 32;

/// A vision tower and its preprocessing, shared read-only.
#[derive(Debug)]
pub struct ImageEncoder {
    tower: ClipVision,
    processor: ImageProcessor,
}

impl ImageEncoder {
    /// Loads `DIR`: config.json, safetensors and preprocessor_config.json
    /// (CLIP's defaults for the tower's size when absent).
    pub fn load(dir: &Path, opts: &ModelOptions) -> Result<Self> {
        Self::from_tower(ClipVision::load(dir, opts)?, dir)
    }

    /// A built tower (merged weights, say) with the image processor of
    /// `side_files` (its preprocessor_config.json).
    pub fn from_tower(tower: ClipVision, side_files: &Path) -> Result<Self> {
        let processor = ImageProcessor::from_dir(side_files, tower.config())?;
        Ok(ImageEncoder { tower, processor })
    }

    /// The tower.
    pub fn tower(&self) -> &ClipVision {
        &self.tower
    }

    /// The tower's architecture.
    pub fn config(&self) -> &VisionConfig {
        self.tower.config()
    }

    /// The preprocessing.
    pub fn processor(&self) -> &ImageProcessor {
        &self.processor
    }

    /// Width of the embeddings.
    pub fn dimension(&self) -> usize {
        self.tower.dimension()
    }

    /// Bytes of the tower's tensors in memory.
    pub fn resident_bytes(&self) -> u64 {
        self.tower.resident_bytes()
    }

    /// One embedding per image, in order (projected when the checkpoint has
    /// `visual_projection`), [`IMAGE_BATCH`] images per forward pass.
    /// Stops with [`RuntimeError::Cancelled`] once `cancelled()` says so.
    pub fn embed_until(
        &self,
        images: &[RgbImage],
        cancelled: &dyn Fn() -> bool,
    ) -> Result<Vec<Vec<f32>>> {
        let mut out = Vec::with_capacity(images.len());
        for chunk in images.chunks(IMAGE_BATCH) {
            if cancelled() {
                return Err(RuntimeError::Cancelled);
            }
            let pixels = self.processor.pixels(chunk, self.tower.device())?;
            let e = self.tower.embed(&pixels)?;
            out.extend(e.to_vec2::<f32>()?);
        }
        Ok(out)
    }

    /// [`ImageEncoder::embed_until`] without cancellation.
    pub fn embed(&self, images: &[RgbImage]) -> Result<Vec<Vec<f32>>> {
        self.embed_until(images, &|| false)
    }
}
