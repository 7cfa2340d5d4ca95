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
        let pixels = |i: usize| Ok(self.processor.process(&images[i]));
        self.embed_processed(images.len(), &pixels, cancelled)
    }

    /// [`ImageEncoder::embed_until`] over `count` images that `image(i)`
    /// produces (decodes) one at a time: each is preprocessed at once and
    /// dropped, so at most one full-size image is in memory beside the
    /// model-sized pixels of one batch, whatever the images' sizes.
    pub fn embed_each_until(
        &self,
        count: usize,
        image: &dyn Fn(usize) -> Result<RgbImage>,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<Vec<Vec<f32>>> {
        let pixels = |i: usize| Ok(self.processor.process(&image(i)?));
        self.embed_processed(count, &pixels, cancelled)
    }

    /// The embeddings of `count` images whose processed pixels
    /// `pixels_of(i)` gives, [`IMAGE_BATCH`] per forward pass.
    fn embed_processed(
        &self,
        count: usize,
        pixels_of: &dyn Fn(usize) -> Result<Vec<f32>>,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<Vec<Vec<f32>>> {
        let c = self.tower.config();
        let per = c.num_channels * c.image_size * c.image_size;
        let mut out = Vec::with_capacity(count);
        let mut start = 0;
        while start < count {
            let end = (start + IMAGE_BATCH).min(count);
            let mut pixels = Vec::with_capacity((end - start) * per);
            for i in start..end {
                if cancelled() {
                    return Err(RuntimeError::Cancelled);
                }
                let v = pixels_of(i)?;
                if v.len() != per {
                    return Err(RuntimeError::InvalidInput(format!(
                        "image {i} preprocesses to {} values; this model takes {}×{}×{}",
                        v.len(),
                        c.num_channels,
                        c.image_size,
                        c.image_size
                    )));
                }
                pixels.extend(v);
            }
            let t = candle_core::Tensor::from_vec(
                pixels,
                (end - start, c.num_channels, c.image_size, c.image_size),
                self.tower.device(),
            )?;
            out.extend(self.tower.embed(&t)?.to_vec2::<f32>()?);
            start = end;
        }
        Ok(out)
    }

    /// [`ImageEncoder::embed_until`] without cancellation.
    pub fn embed(&self, images: &[RgbImage]) -> Result<Vec<Vec<f32>>> {
        self.embed_until(images, &|| false)
    }
}
