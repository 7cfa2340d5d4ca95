//! Vision towers: CLIP's vision transformer ([`ClipVision`]), configured
//! from a Hugging Face `config.json` ([`VisionConfig`]), its image
//! preprocessing ([`ImageProcessor`]) and the two together
//! ([`ImageEncoder`]).

pub mod clip;
pub mod config;
pub mod images;
pub mod preprocess;

pub use clip::{ClipVision, VisionOutput};
pub use config::{VisionActivation, VisionConfig};
pub use images::ImageEncoder;
pub use preprocess::{ImageProcessor, RgbImage};
