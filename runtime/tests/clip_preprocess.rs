//! CLIP image preprocessing against `transformers`' `CLIPImageProcessor`
//! (Pillow's bicubic resize, the centre crop with its zero padding, the
//! rescale and normalisation): the same f32 pixel values, bit for bit, on
//! PNGs shrunk, enlarged, cropped and padded. Skipped, with the reason
//! printed, where python3 with transformers and Pillow 12 is missing (`make
//! test` installs them; Pillow 13 runs the two passes in another order
//! for some sizes).

use std::path::Path;
use std::process::Command;

use runtime::vision::preprocess::{ImageProcessor, RgbImage};
use runtime::vision::VisionConfig;

/// A deterministic image with smooth gradients and noise (so resampling
/// has something to round).
fn image(w: u32, h: u32, seed: u64) -> image::RgbImage {
    let mut s = seed;
    image::RgbImage::from_fn(w, h, |x, y| {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let n = (s >> 56) as u32;
        image::Rgb([
            ((x * 255 / w.max(1)) as u8).wrapping_add((n % 32) as u8),
            ((y * 255 / h.max(1)) as u8) ^ (n as u8),
            ((x + y) * 7 % 256) as u8,
        ])
    })
}

#[test]
fn pixels_equal_clip_image_processor() {
    let probe = Command::new("python3")
        .args([
            "-c",
            "import PIL, numpy, transformers, sys; sys.exit(not PIL.__version__.startswith('12.'))",
        ])
        .output();
    if !probe.map(|o| o.status.success()).unwrap_or(false) {
        eprintln!("SKIPPED pixels_equal_clip_image_processor: python3 with transformers, numpy and Pillow 12 is not installed (run `make test`; Pillow 13 orders the resampling passes otherwise)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sizes = [
        (37, 23),
        (23, 37),
        (50, 50),
        (16, 9),
        (300, 200),
        (28, 28),
        (29, 101),
    ];
    for (i, &(w, h)) in sizes.iter().enumerate() {
        image(w, h, i as u64 + 1)
            .save(dir.path().join(format!("img{i}.png")))
            .unwrap();
    }
    let edges = [28usize, 32, 20];
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/reference/clip_preprocess.py"
    );
    let edge_list = edges.map(|e| e.to_string()).join(",");
    let out = Command::new("python3")
        .arg(script)
        .arg(dir.path())
        .arg(&edge_list)
        .output()
        .expect("run python3");
    assert!(
        out.status.success(),
        "the reference failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let config = VisionConfig::from_json(
        r#"{"model_type":"clip_vision_model","hidden_size":32,"num_attention_heads":4,
        "image_size":28,"patch_size":7}"#,
        Path::new("config.json"),
    )
    .unwrap();
    let mut compared = 0;
    for edge in edges {
        let proc = ImageProcessor::from_json(
            &format!(r#"{{"size": {{"shortest_edge": {edge}}}, "crop_size": {{"height": 28, "width": 28}}, "resample": 3}}"#),
            Path::new("preprocessor_config.json"),
            &config,
        )
        .unwrap();
        for (i, size) in sizes.iter().enumerate() {
            let bytes = std::fs::read(dir.path().join(format!("img{i}.png"))).unwrap();
            let img = RgbImage::decode(&bytes, &format!("img{i}.png")).unwrap();
            let got = proc.process(&img);
            let raw = std::fs::read(dir.path().join(format!("img{i}.{edge}.f32"))).unwrap();
            let want: Vec<f32> = raw
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            assert_eq!(got.len(), want.len());
            let differ = got
                .iter()
                .zip(&want)
                .filter(|(a, b)| a.to_bits() != b.to_bits())
                .count();
            let max = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert_eq!(
                differ,
                0,
                "img{i} ({size:?}), shortest edge {edge}: {differ} of {} values differ, max {max}",
                got.len()
            );
            compared += 1;
        }
    }
    assert_eq!(compared, sizes.len() * edges.len());
}

#[test]
fn corrupt_and_odd_images_are_errors_naming_the_input() {
    let err = RgbImage::decode(b"not an image", "input 3")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("input 3") && err.contains("PNG or JPEG"),
        "{err}"
    );
    let mut png = Vec::new();
    image(8, 8, 1)
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .unwrap();
    let cut = &png[..png.len() / 2];
    let err = RgbImage::decode(cut, "input 0").unwrap_err().to_string();
    assert!(err.contains("input 0") && err.contains("corrupt"), "{err}");
    let err = RgbImage::from_raw(2, 2, vec![0; 11], "input 1")
        .unwrap_err()
        .to_string();
    assert!(err.contains("input 1") && err.contains("2×2"), "{err}");
    let config = VisionConfig::from_json(
        r#"{"image_size":28,"patch_size":7,"hidden_size":32,"num_attention_heads":4}"#,
        Path::new("config.json"),
    )
    .unwrap();
    let bad = ImageProcessor::from_json(
        r#"{"crop_size": {"height": 30, "width": 30}}"#,
        Path::new("p.json"),
        &config,
    )
    .unwrap_err()
    .to_string();
    assert!(
        bad.contains("crop_size 30×30") && bad.contains("28"),
        "{bad}"
    );
    let bad =
        ImageProcessor::from_json(r#"{"image_std": [0.5, 0.5]}"#, Path::new("p.json"), &config)
            .unwrap_err()
            .to_string();
    assert!(bad.contains("image_std"), "{bad}");
}
