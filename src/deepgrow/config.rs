//! Per-model pipeline parameters.

use serde::{Deserialize, Serialize};

/// Largest network input side accepted by [`PipelineConfig::validate`].
pub const MAX_MODEL_SIDE: usize = 4096;
/// Largest crop side accepted by [`PipelineConfig::validate`].
pub const MAX_CROP_SIDE: usize = 16384;
/// Largest margin accepted by [`PipelineConfig::validate`].
pub const MAX_MARGIN: usize = 4096;
/// Largest Gaussian sigma accepted by [`PipelineConfig::validate`] (the kernel has `2*int(4*sigma+0.5)+1` taps).
pub const MAX_SIGMA: f32 = 64.0;

/// The parameters of the Deepgrow 2D stage list (spec section 2, stages 3-11).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineConfig {
    /// Network input `H x W` (`Resized(model_size, area)`); NGC: 256 x 256.
    pub model_size: [usize; 2],
    /// `SpatialCropGuidanced(spatial_size)`; NGC: 256 x 256.
    pub crop_size: [usize; 2],
    /// `SpatialCropGuidanced(margin)`, pixels around the clicks' bounding box.
    #[serde(default = "default_margin")]
    pub margin: usize,
    /// `NormalizeIntensityd(subtrahend)`; NGC: 208.
    pub subtrahend: f32,
    /// `NormalizeIntensityd(divisor)`; NGC: 388.
    pub divisor: f32,
    /// `AddGuidanceSignald(sigma)`, in pixels of the network input.
    #[serde(default = "default_sigma")]
    pub sigma: f32,
    /// `Spacingd(pixdim)`, in mm: the in-plane spacing the slice is resampled to.
    #[serde(default = "default_target_spacing")]
    pub target_spacing: [f64; 2],
}

fn default_margin() -> usize {
    20
}

fn default_sigma() -> f32 {
    2.0
}

fn default_target_spacing() -> [f64; 2] {
    [1.0, 1.0]
}

impl PipelineConfig {
    /// The values of the NGC `clara_pt_deepgrow_2d_annotation` model and MONAI Label:
    /// 256 x 256 input and crop, margin 20, `(x - 208) / 388`, sigma 2, 1 mm.
    pub fn clara_deepgrow_2d() -> Self {
        PipelineConfig {
            model_size: [256, 256],
            crop_size: [256, 256],
            margin: default_margin(),
            subtrahend: 208.0,
            divisor: 388.0,
            sigma: default_sigma(),
            target_spacing: default_target_spacing(),
        }
    }

    /// Checks every value; the message names the offending field.
    pub fn validate(&self) -> Result<(), String> {
        for (name, size, max) in [
            ("model_size", self.model_size, MAX_MODEL_SIDE),
            ("crop_size", self.crop_size, MAX_CROP_SIDE),
        ] {
            if size.iter().any(|&n| n == 0 || n > max) {
                return Err(format!(
                    "{name} {size:?}: each side must be between 1 and {max}"
                ));
            }
        }
        if self.margin > MAX_MARGIN {
            return Err(format!(
                "margin {}: must be at most {MAX_MARGIN}",
                self.margin
            ));
        }
        if !self.subtrahend.is_finite() {
            return Err(format!(
                "subtrahend {}: must be a finite number",
                self.subtrahend
            ));
        }
        if !self.divisor.is_finite() || self.divisor == 0.0 {
            return Err(format!(
                "divisor {}: must be a finite, non-zero number",
                self.divisor
            ));
        }
        if !(self.sigma > 0.0 && self.sigma <= MAX_SIGMA) {
            return Err(format!(
                "sigma {}: must be greater than 0 and at most {MAX_SIGMA}",
                self.sigma
            ));
        }
        if self
            .target_spacing
            .iter()
            .any(|&t| !(t.is_finite() && t > 0.0))
        {
            return Err(format!(
                "target_spacing {:?}: each value must be finite and greater than 0",
                self.target_spacing
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clara_defaults_are_valid() {
        PipelineConfig::clara_deepgrow_2d().validate().unwrap();
    }

    #[test]
    fn json_defaults_and_unknown_fields() {
        let c: PipelineConfig = serde_json::from_str(
            r#"{"model_size":[512,512],"crop_size":[512,512],"subtrahend":208,"divisor":388}"#,
        )
        .unwrap();
        assert_eq!(c.margin, 20);
        assert_eq!(c.sigma, 2.0);
        assert_eq!(c.target_spacing, [1.0, 1.0]);
        assert!(serde_json::from_str::<PipelineConfig>(
            r#"{"model_size":[1,1],"crop_size":[1,1],"subtrahend":0,"divisor":1,"extra":1}"#,
        )
        .is_err());
    }

    #[test]
    fn rejects_bad_values() {
        let ok = PipelineConfig::clara_deepgrow_2d();
        let bad = [
            PipelineConfig {
                model_size: [0, 256],
                ..ok.clone()
            },
            PipelineConfig {
                crop_size: [256, MAX_CROP_SIDE + 1],
                ..ok.clone()
            },
            PipelineConfig {
                margin: MAX_MARGIN + 1,
                ..ok.clone()
            },
            PipelineConfig {
                subtrahend: f32::NAN,
                ..ok.clone()
            },
            PipelineConfig {
                divisor: 0.0,
                ..ok.clone()
            },
            PipelineConfig {
                divisor: f32::INFINITY,
                ..ok.clone()
            },
            PipelineConfig {
                sigma: 0.0,
                ..ok.clone()
            },
            PipelineConfig {
                sigma: f32::NAN,
                ..ok.clone()
            },
            PipelineConfig {
                target_spacing: [1.0, 0.0],
                ..ok.clone()
            },
            PipelineConfig {
                target_spacing: [f64::NAN, 1.0],
                ..ok.clone()
            },
        ];
        for c in bad {
            assert!(c.validate().is_err(), "{c:?}");
        }
    }
}
