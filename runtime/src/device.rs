//! Choosing the merge device: `auto | cpu | cuda:N`.

use candle_core::Device;

use crate::error::{Result, RuntimeError};

/// Parses a device name. `auto` picks CUDA device 0 when the binary was
/// built with the `cuda` feature and a GPU is present, else the CPU.
pub fn parse_device(name: &str) -> Result<Device> {
    match name {
        "cpu" => Ok(Device::Cpu),
        "auto" => Ok(if candle_core::utils::cuda_is_available() {
            Device::new_cuda(0).unwrap_or(Device::Cpu)
        } else {
            Device::Cpu
        }),
        other => {
            let idx = other
                .strip_prefix("cuda:")
                .or_else(|| (other == "cuda").then_some("0"))
                .and_then(|i| i.parse::<usize>().ok())
                .ok_or_else(|| {
                    RuntimeError::Device(
                        other.to_string(),
                        "expected auto, cpu or cuda:N".to_string(),
                    )
                })?;
            if !candle_core::utils::cuda_is_available() {
                return Err(RuntimeError::Device(
                    other.to_string(),
                    "this binary was built without CUDA (build with `--features cuda`)".to_string(),
                ));
            }
            Device::new_cuda(idx)
                .map_err(|e| RuntimeError::Device(other.to_string(), e.to_string()))
        }
    }
}

/// A short human name of a device.
pub fn device_name(device: &Device) -> String {
    match device {
        Device::Cpu => "cpu".to_string(),
        Device::Cuda(_) => "cuda".to_string(),
        Device::Metal(_) => "metal".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(parse_device("cpu").unwrap().is_cpu());
        assert!(parse_device("auto").is_ok());
        let e = parse_device("tpu:0").unwrap_err().to_string();
        assert!(e.contains("expected auto, cpu or cuda:N"), "{e}");
    }
}
