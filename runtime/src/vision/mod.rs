//! Vision towers: CLIP's vision transformer ([`ClipVision`]), configured
//! from a Hugging Face `config.json` ([`VisionConfig`]).

pub mod clip;
pub mod config;
pub mod preprocess;

pub use clip::{ClipVision, VisionOutput};
pub use config::{VisionActivation, VisionConfig};
pub use preprocess::{ImageProcessor, RgbImage};
