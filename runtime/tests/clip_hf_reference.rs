//! A CLIP vision folder as the runtime writes it (config.json from
//! `VisionConfig::to_hf_json`, preprocessor_config.json from
//! `ImageProcessor::to_json`, weights by Hugging Face name) read by
//! `transformers`' own `CLIPVisionConfig` and `CLIPImageProcessor`, and
//! embedded as `CLIPVisionModelWithProjection` computes it
//! (`tests/reference/clip_vision_hf.py`, in numpy, f64): the same image
//! embeddings as `ImageEncoder` within 1e-4. Skipped, with the reason
//! printed, where python3 with transformers, numpy, Pillow and safetensors
//! is missing (`make test` installs them).

use std::collections::HashMap;
use std::process::Command;

use candle_core::{Device, Tensor};
use runtime::model::ModelOptions;
use runtime::vision::{ImageEncoder, ImageProcessor, RgbImage, VisionConfig};

#[test]
fn embeddings_equal_transformers_clip_vision_model_with_projection() {
    let probe = Command::new("python3")
        .args(["-c", "import PIL, numpy, safetensors, transformers"])
        .output();
    if !probe.map(|o| o.status.success()).unwrap_or(false) {
        eprintln!("SKIPPED embeddings_equal_transformers_clip_vision_model_with_projection: python3 with transformers, numpy, Pillow and safetensors is not installed (run `make test`)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for act in ["quick_gelu", "gelu"] {
        let config = VisionConfig::from_json(
            &format!(
                r#"{{"model_type":"clip_vision_model","hidden_size":32,"intermediate_size":48,
                "num_hidden_layers":2,"num_attention_heads":4,"image_size":32,"patch_size":8,
                "projection_dim":24,"hidden_act":"{act}","layer_norm_eps":1e-5}}"#
            ),
            std::path::Path::new("config.json"),
        )
        .unwrap();
        // Random weights; norm scales around 1 so the norms matter.
        let mut s = 7u64;
        let mut next = || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.4
        };
        let mut weights = HashMap::new();
        for (name, shape) in config.tensor_shapes() {
            let n: usize = shape.iter().product();
            let norm = name.contains("norm") && name.ends_with(".weight");
            let v: Vec<f32> = (0..n)
                .map(|_| if norm { 1.0 + next() } else { next() })
                .collect();
            weights.insert(
                name,
                Tensor::from_vec(v, shape.as_slice(), &Device::Cpu).unwrap(),
            );
        }
        candle_core::safetensors::save(&weights, d.join("model.safetensors")).unwrap();
        std::fs::write(
            d.join("config.json"),
            serde_json::to_vec(&config.to_hf_json()).unwrap(),
        )
        .unwrap();
        // Shortest edge 36, crop 32: a real resize and crop.
        let processor = ImageProcessor {
            shortest_edge: Some(36),
            crop: Some((32, 32)),
            ..ImageProcessor::clip_default(&config)
        };
        std::fs::write(
            d.join("preprocessor_config.json"),
            serde_json::to_vec(&processor.to_json()).unwrap(),
        )
        .unwrap();
        let mut files = Vec::new();
        let mut images = Vec::new();
        for (k, (w, h)) in [(40usize, 50usize), (64, 33), (32, 32)]
            .into_iter()
            .enumerate()
        {
            let data: Vec<u8> = (0..w * h * 3)
                .map(|i| ((i * 31 + k * 17) % 251) as u8 ^ ((i / 7) as u8))
                .collect();
            let img = RgbImage::from_raw(w, h, data, "img").unwrap();
            let f = d.join(format!("img{k}.png"));
            std::fs::write(&f, img.to_png()).unwrap();
            files.push(f);
            images.push(img);
        }
        let out = Command::new("python3")
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/reference/clip_vision_hf.py"
            ))
            .arg(d)
            .args(&files)
            .output()
            .expect("run python3");
        assert!(
            out.status.success(),
            "the reference failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let read: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(read["hidden_act"], act, "transformers read {read}");
        assert_eq!(read["projection_dim"], 24, "transformers read {read}");
        let raw = std::fs::read(d.join("hf_embeds.f32")).unwrap();
        let want: Vec<f32> = raw
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let encoder = ImageEncoder::load(d, &ModelOptions::default()).unwrap();
        let got: Vec<f32> = encoder.embed(&images).unwrap().concat();
        assert_eq!(got.len(), want.len());
        let max = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(max < 1e-4, "{act}: max difference {max}");
    }
}
