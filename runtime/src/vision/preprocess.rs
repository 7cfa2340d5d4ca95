//! Image preprocessing as `transformers`' `CLIPImageProcessor` does it,
//! configured from `preprocessor_config.json`:
//!
//! ```text
//! RGB u8 → resize (shortest edge = size, the other edge ⌊size·long/short⌋,
//!          Pillow's bicubic) → centre crop (crop_size; zero padding when
//!          smaller) → x·rescale_factor → (x − mean) / std → (3, H, W) f32
//! ```
//!
//! The resize is Pillow 12's `Image.resize(resample=BICUBIC)` itself: the same
//! separable convolution (horizontal pass, then vertical), a cubic kernel
//! with a = −0.5 whose support widens by the scale when shrinking, the same
//! coefficients rounded to 22-bit fixed point and the same rounding and
//! clipping to u8 after each pass, so pixels come out as Pillow's (tested
//! against `CLIPImageProcessor` bit for bit on PNGs, Pillow 12.1.1; Pillow
//! 13 runs the vertical pass first for some sizes, which moves a pixel by
//! a few levels where the image has fine detail). PNG and JPEG are
//! decoded with the `image` crate (a JPEG's IDCT may differ from libjpeg's
//! by a level here and there); raw RGB arrays are taken as they are.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::config::VisionConfig;
use crate::error::{Result, RuntimeError};

/// OpenAI CLIP's per-channel mean (`OPENAI_CLIP_MEAN`).
pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
/// OpenAI CLIP's per-channel standard deviation (`OPENAI_CLIP_STD`).
pub const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_6, 0.275_777_1];

/// Images larger than this many pixels are refused before decoding.
pub const MAX_PIXELS: u64 = 64 << 20;

/// An RGB image, row-major, 3 bytes per pixel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RgbImage {
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    /// `height · width · 3` bytes.
    pub data: Vec<u8>,
}

impl RgbImage {
    /// Wraps raw RGB bytes; `what` names the input in errors.
    pub fn from_raw(width: usize, height: usize, data: Vec<u8>, what: &str) -> Result<Self> {
        if width == 0 || height == 0 || data.len() != width * height * 3 {
            return Err(RuntimeError::InvalidInput(format!(
                "{what}: {} bytes are not a {width}×{height} RGB image ({} bytes)",
                data.len(),
                width * height * 3
            )));
        }
        Ok(RgbImage {
            width,
            height,
            data,
        })
    }

    /// Decodes a PNG or JPEG (any colour type, converted to RGB as
    /// Pillow's `convert("RGB")` does for opaque images); `what` names the
    /// input in errors.
    pub fn decode(bytes: &[u8], what: &str) -> Result<Self> {
        let bad = |reason: String| RuntimeError::InvalidInput(format!("{what}: {reason}"));
        let format =
            image::guess_format(bytes).map_err(|_| bad("not a PNG or JPEG image".to_string()))?;
        if !matches!(format, image::ImageFormat::Png | image::ImageFormat::Jpeg) {
            return Err(bad(format!("{format:?} images are not read (PNG, JPEG)")));
        }
        let reader = image::ImageReader::with_format(std::io::Cursor::new(bytes), format);
        let (w, h) = reader
            .into_dimensions()
            .map_err(|e| bad(format!("corrupt image: {e}")))?;
        if w as u64 * h as u64 > MAX_PIXELS {
            return Err(bad(format!(
                "{w}×{h} pixels is more than the {MAX_PIXELS} an image may have"
            )));
        }
        let img = image::load_from_memory_with_format(bytes, format)
            .map_err(|e| bad(format!("corrupt image: {e}")))?
            .to_rgb8();
        let (w, h) = (img.width() as usize, img.height() as usize);
        Self::from_raw(w, h, img.into_raw(), what)
    }

    /// Decodes a data URL, `data:image/png;base64,...` (or `image/jpeg`),
    /// as the OpenAI API takes images; `what` names the input in errors.
    pub fn from_data_url(url: &str, what: &str) -> Result<Self> {
        use base64::Engine as _;
        let bad = |reason: &str| RuntimeError::InvalidInput(format!("{what}: {reason}"));
        let rest = url
            .strip_prefix("data:")
            .ok_or_else(|| bad("not a data URL (`data:image/png;base64,...`)"))?;
        let (head, payload) = rest
            .split_once(',')
            .ok_or_else(|| bad("a data URL without a `,` before its payload"))?;
        let media = head
            .strip_suffix(";base64")
            .ok_or_else(|| bad("the data URL is not base64 (`;base64,`)"))?;
        if !matches!(media, "image/png" | "image/jpeg" | "image/jpg") {
            return Err(bad(&format!(
                "media type `{media}` is not an image this reads (image/png, image/jpeg)"
            )));
        }
        if payload.len() as u64 > MAX_PIXELS {
            return Err(bad("the data URL is larger than an image may be"));
        }
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(payload.trim())
            .map_err(|e| bad(&format!("invalid base64: {e}")))?;
        Self::decode(&bytes, what)
    }

    /// Reads and decodes a PNG or JPEG file.
    pub fn open(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| RuntimeError::io(path, e))?;
        Self::decode(&bytes, &path.display().to_string())
    }

    /// The image as PNG bytes (8-bit RGB; grey when every pixel is).
    pub fn to_png(&self) -> Vec<u8> {
        let mut out = std::io::Cursor::new(Vec::new());
        let grey = self.data.chunks(3).all(|p| p[0] == p[1] && p[1] == p[2]);
        let (w, h) = (self.width as u32, self.height as u32);
        let written = if grey {
            let g: Vec<u8> = self.data.chunks(3).map(|p| p[0]).collect();
            image::GrayImage::from_raw(w, h, g)
                .expect("sized")
                .write_to(&mut out, image::ImageFormat::Png)
        } else {
            image::RgbImage::from_raw(w, h, self.data.clone())
                .expect("sized")
                .write_to(&mut out, image::ImageFormat::Png)
        };
        written.expect("PNG encoding to memory does not fail");
        out.into_inner()
    }

    /// The image as a `data:image/png;base64,...` URL.
    pub fn to_data_url(&self) -> String {
        use base64::Engine as _;
        format!(
            "data:image/png;base64,{}",
            base64::engine::general_purpose::STANDARD.encode(self.to_png())
        )
    }
}

/// The steps of `CLIPImageProcessor`.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageProcessor {
    /// Resize so that the shorter edge is this long (`None`: no resize).
    pub shortest_edge: Option<usize>,
    /// Centre crop to `(height, width)` (`None`: no crop).
    pub crop: Option<(usize, usize)>,
    /// Multiplies the u8 values (`None`: none).
    pub rescale_factor: Option<f64>,
    /// Per-channel mean and standard deviation (`None`: no normalisation).
    pub normalize: Option<([f32; 3], [f32; 3])>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Size {
    Edge(usize),
    Shortest { shortest_edge: usize },
    Square { height: usize, width: usize },
}

#[derive(Deserialize)]
struct RawProcessor {
    do_resize: Option<bool>,
    size: Option<Size>,
    resample: Option<u32>,
    do_center_crop: Option<bool>,
    crop_size: Option<Size>,
    do_rescale: Option<bool>,
    rescale_factor: Option<f64>,
    do_normalize: Option<bool>,
    image_mean: Option<Vec<f32>>,
    image_std: Option<Vec<f32>>,
}

impl ImageProcessor {
    /// CLIP's defaults for a tower of `config.image_size`: resize the
    /// shortest edge to it, crop it square, rescale by 1/255, normalise
    /// with OpenAI's mean and std.
    pub fn clip_default(config: &VisionConfig) -> Self {
        ImageProcessor {
            shortest_edge: Some(config.image_size),
            crop: Some((config.image_size, config.image_size)),
            rescale_factor: Some(1.0 / 255.0),
            normalize: Some((CLIP_MEAN, CLIP_STD)),
        }
    }

    /// `DIR/preprocessor_config.json`, or [`ImageProcessor::clip_default`]
    /// when the folder has none.
    pub fn from_dir(dir: &Path, config: &VisionConfig) -> Result<Self> {
        let path = dir.join("preprocessor_config.json");
        match std::fs::read_to_string(&path) {
            Ok(text) => Self::from_json(&text, &path, config),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::clip_default(config)),
            Err(e) => Err(RuntimeError::ModelConfig {
                path,
                reason: e.to_string(),
            }),
        }
    }

    /// Parses preprocessor_config.json; `path` names it in errors. Missing
    /// keys take `CLIPImageProcessor`'s defaults; the crop must give the
    /// tower's `image_size`.
    pub fn from_json(text: &str, path: &Path, config: &VisionConfig) -> Result<Self> {
        let bad = |reason: String| RuntimeError::ModelConfig {
            path: PathBuf::from(path),
            reason,
        };
        let raw: RawProcessor = serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
        if let Some(r) = raw.resample {
            if r != 3 {
                return Err(bad(format!(
                    "resample {r} is not supported (3, bicubic, as CLIP uses)"
                )));
            }
        }
        let shortest_edge = match (raw.do_resize.unwrap_or(true), raw.size) {
            (false, _) => None,
            (true, None) => Some(224),
            (true, Some(Size::Edge(e) | Size::Shortest { shortest_edge: e })) => Some(e),
            (true, Some(Size::Square { .. })) => {
                return Err(bad(
                    "`size` as height and width is not CLIP's (shortest_edge)".into(),
                ))
            }
        };
        let crop = match (raw.do_center_crop.unwrap_or(true), raw.crop_size) {
            (false, _) => None,
            (true, None) => Some((224, 224)),
            (true, Some(Size::Edge(e) | Size::Shortest { shortest_edge: e })) => Some((e, e)),
            (true, Some(Size::Square { height, width })) => Some((height, width)),
        };
        let channel = |v: Option<Vec<f32>>, default: [f32; 3], key: &str| -> Result<[f32; 3]> {
            match v {
                None => Ok(default),
                Some(v) => <[f32; 3]>::try_from(v.as_slice())
                    .map_err(|_| bad(format!("`{key}` needs 3 values, one per channel"))),
            }
        };
        let mean = channel(raw.image_mean, CLIP_MEAN, "image_mean")?;
        let std = channel(raw.image_std, CLIP_STD, "image_std")?;
        if std.iter().any(|s| !(s.is_finite() && *s > 0.0)) || mean.iter().any(|m| !m.is_finite()) {
            return Err(bad(
                "`image_std` must be positive, `image_mean` finite".into()
            ));
        }
        let p = ImageProcessor {
            shortest_edge,
            crop,
            rescale_factor: raw
                .do_rescale
                .unwrap_or(true)
                .then(|| raw.rescale_factor.unwrap_or(1.0 / 255.0)),
            normalize: raw.do_normalize.unwrap_or(true).then_some((mean, std)),
        };
        if shortest_edge == Some(0) || matches!(crop, Some((0, _) | (_, 0))) {
            return Err(bad("`size` and `crop_size` must be positive".into()));
        }
        match crop {
            Some((h, w)) if (h, w) != (config.image_size, config.image_size) => Err(bad(format!(
                "crop_size {h}×{w} does not give the model's image_size ({})",
                config.image_size
            ))),
            None if shortest_edge.is_some() => Err(bad(
                "without a centre crop the resized image is not the model's square input".into(),
            )),
            _ => Ok(p),
        }
    }

    /// The preprocessor_config.json of these steps (`CLIPImageProcessor`).
    pub fn to_json(&self) -> serde_json::Value {
        let (mean, std) = self.normalize.unwrap_or((CLIP_MEAN, CLIP_STD));
        let (ch, cw) = self.crop.unwrap_or((224, 224));
        serde_json::json!({
            "image_processor_type": "CLIPImageProcessor",
            "do_resize": self.shortest_edge.is_some(),
            "size": {"shortest_edge": self.shortest_edge.unwrap_or(224)},
            "resample": 3,
            "do_center_crop": self.crop.is_some(),
            "crop_size": {"height": ch, "width": cw},
            "do_rescale": self.rescale_factor.is_some(),
            "rescale_factor": self.rescale_factor.unwrap_or(1.0 / 255.0),
            "do_normalize": self.normalize.is_some(),
            "image_mean": mean,
            "image_std": std,
            "do_convert_rgb": true,
        })
    }

    /// The processed pixels of one image, `(3, H, W)` values in f32.
    pub fn process(&self, img: &RgbImage) -> Vec<f32> {
        let mut img = img.clone();
        if let Some(edge) = self.shortest_edge {
            let (w, h) = (img.width, img.height);
            let (short, long) = if w <= h { (w, h) } else { (h, w) };
            let new_long = (edge as f64 * long as f64 / short as f64) as usize;
            let (nw, nh) = if w <= h {
                (edge, new_long)
            } else {
                (new_long, edge)
            };
            img = resize_bicubic(&img, nw, nh);
        }
        if let Some((ch, cw)) = self.crop {
            img = center_crop(&img, ch, cw);
        }
        let (h, w) = (img.height, img.width);
        let mut out = vec![0f32; 3 * h * w];
        for c in 0..3 {
            for i in 0..h * w {
                let v = img.data[i * 3 + c];
                let mut x = match self.rescale_factor {
                    Some(f) => (v as f64 * f) as f32,
                    None => v as f32,
                };
                if let Some((mean, std)) = &self.normalize {
                    x = (x - mean[c]) / std[c];
                }
                out[c * h * w + i] = x;
            }
        }
        out
    }
}

/// Bits of Pillow's fixed-point coefficients for 8-bit images.
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Pillow's bicubic kernel (a = −0.5), support 2.
fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Pillow's `precompute_coeffs` and `normalize_coeffs_8bpc`: for each
/// output index, the first input index, the count, and fixed-point
/// weights (`ksize` per output).
fn coefficients(in_size: usize, out_size: usize) -> (Vec<(usize, usize)>, Vec<i32>, usize) {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = 2.0 * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut bounds = Vec::with_capacity(out_size);
    let mut kk = vec![0i32; out_size * ksize];
    let mut k = vec![0f64; ksize];
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        // C's (int) truncates toward zero.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
        let n = xmax.saturating_sub(xmin);
        let mut ww = 0.0;
        for (x, kx) in k.iter_mut().enumerate().take(n) {
            let w = bicubic((x as f64 + xmin as f64 - center + 0.5) * ss);
            *kx = w;
            ww += w;
        }
        for (x, kx) in k.iter().enumerate().take(n) {
            let v = if ww != 0.0 { kx / ww } else { *kx };
            let fixed = v * (1i64 << PRECISION_BITS) as f64;
            kk[xx * ksize + x] = if v < 0.0 {
                (-0.5 + fixed) as i32
            } else {
                (0.5 + fixed) as i32
            };
        }
        bounds.push((xmin, n));
    }
    (bounds, kk, ksize)
}

/// Pillow's `clip8`: the fixed-point sum back to a byte.
fn clip8(v: i32) -> u8 {
    (v >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Pillow's `Image.resize((w, h), BICUBIC)` of an RGB image.
pub fn resize_bicubic(img: &RgbImage, w: usize, h: usize) -> RgbImage {
    let (iw, ih) = (img.width, img.height);
    let (hb, hk, hks) = coefficients(iw, w);
    let (vb, vk, vks) = coefficients(ih, h);
    let half = 1i32 << (PRECISION_BITS - 1);
    // Rows of the input the vertical pass reads.
    let first = vb.first().map_or(0, |b| b.0);
    let last = vb.last().map_or(0, |b| b.0 + b.1);
    let (tmp, tmp_first) = if w != iw {
        let rows = last - first;
        let mut tmp = vec![0u8; rows * w * 3];
        for y in 0..rows {
            let src = &img.data[(y + first) * iw * 3..(y + first + 1) * iw * 3];
            for (xx, &(xmin, n)) in hb.iter().enumerate() {
                let k = &hk[xx * hks..xx * hks + n];
                let mut ss = [half; 3];
                for (x, &kx) in k.iter().enumerate() {
                    for (c, s) in ss.iter_mut().enumerate() {
                        *s += src[(x + xmin) * 3 + c] as i32 * kx;
                    }
                }
                for c in 0..3 {
                    tmp[(y * w + xx) * 3 + c] = clip8(ss[c]);
                }
            }
        }
        (tmp, first)
    } else {
        (img.data.clone(), 0)
    };
    if h == ih {
        return RgbImage {
            width: w,
            height: h,
            data: tmp,
        };
    }
    let mut out = vec![0u8; h * w * 3];
    for (yy, &(ymin, n)) in vb.iter().enumerate() {
        let k = &vk[yy * vks..yy * vks + n];
        for xx in 0..w {
            let mut ss = [half; 3];
            for (y, &ky) in k.iter().enumerate() {
                let row = y + ymin - tmp_first;
                for (c, s) in ss.iter_mut().enumerate() {
                    *s += tmp[(row * w + xx) * 3 + c] as i32 * ky;
                }
            }
            for c in 0..3 {
                out[(yy * w + xx) * 3 + c] = clip8(ss[c]);
            }
        }
    }
    RgbImage {
        width: w,
        height: h,
        data: out,
    }
}

/// `transformers`' `center_crop` to `(ch, cw)`: the centred window, the
/// image zero-padded around first where it is smaller.
pub fn center_crop(img: &RgbImage, ch: usize, cw: usize) -> RgbImage {
    let (h, w) = (img.height as i64, img.width as i64);
    let (ch_, cw_) = (ch as i64, cw as i64);
    let (nh, nw) = (h.max(ch_), w.max(cw_));
    let top_pad = (nh - h + 1) / 2;
    let left_pad = (nw - w + 1) / 2;
    let top = (h - ch_).div_euclid(2) + top_pad;
    let left = (w - cw_).div_euclid(2) + left_pad;
    let mut out = vec![0u8; ch * cw * 3];
    for y in 0..ch_ {
        let sy = top + y - top_pad; // row of the original image
        if sy < 0 || sy >= h {
            continue;
        }
        for x in 0..cw_ {
            let sx = left + x - left_pad;
            if sx < 0 || sx >= w {
                continue;
            }
            let s = ((sy * w + sx) * 3) as usize;
            let d = ((y * cw_ + x) * 3) as usize;
            out[d..d + 3].copy_from_slice(&img.data[s..s + 3]);
        }
    }
    RgbImage {
        width: cw,
        height: ch,
        data: out,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn img(grey: bool) -> RgbImage {
        let data = (0..5 * 3)
            .flat_map(|i| {
                let v = (i * 17 % 256) as u8;
                if grey {
                    [v, v, v]
                } else {
                    [v, 255 - v, v / 2]
                }
            })
            .collect();
        RgbImage::from_raw(5, 3, data, "t").unwrap()
    }

    #[test]
    fn png_and_data_urls_round_trip_grey_and_colour() {
        for grey in [true, false] {
            let i = img(grey);
            assert_eq!(RgbImage::decode(&i.to_png(), "png").unwrap(), i);
            let url = i.to_data_url();
            assert!(url.starts_with("data:image/png;base64,"));
            assert_eq!(RgbImage::from_data_url(&url, "url").unwrap(), i);
        }
    }

    #[test]
    fn bad_data_urls_say_what_is_wrong() {
        let cases = [
            ("image/png;base64,AAAA", "not a data URL"),
            ("data:image/png;base64", "without a `,`"),
            ("data:image/png,AAAA", "not base64"),
            ("data:image/gif;base64,AAAA", "media type `image/gif`"),
            ("data:image/png;base64,@@@", "invalid base64"),
            ("data:image/png;base64,AAAA", "not a PNG or JPEG"),
        ];
        for (url, want) in cases {
            let e = RgbImage::from_data_url(url, "input 3")
                .unwrap_err()
                .to_string();
            assert!(e.contains("input 3") && e.contains(want), "{url}: {e}");
        }
    }
}
