//! The deepgrow `params` JSON as every client sends it, validated once into typed values.
//!
//! Slice rule (documented in the README): an explicit `slice` wins; else the k of `current_point` (Slicer and
//! OHIF send the clicked point there); else the smallest k among all clicks (MONAI's rule). Clicks on other
//! slices are ignored, as the reference does.

use serde::Deserialize;
use serde_json::Value;

use crate::annotate::{MaskFormat, OutputOptions};
use crate::deepgrow::Clicks;
use crate::error::ApiError;
use crate::nifti_io::MaskDtype;

#[derive(Debug, Default, Deserialize)]
struct RawParams {
    #[serde(default)]
    foreground: Option<Value>,
    #[serde(default)]
    background: Option<Value>,
    #[serde(default)]
    current_point: Option<Value>,
    #[serde(default)]
    slice: Option<Value>,
    #[serde(default)]
    result_extension: Option<String>,
    #[serde(default)]
    result_dtype: Option<String>,
    #[serde(default)]
    result_compress: Option<Value>,
    /// The segment a MONAI Label client is drawing (Slicer sends it; a deepgrow model ignores it).
    #[serde(default)]
    label: Option<Value>,
}

#[derive(Debug)]
pub struct DeepgrowParams {
    pub clicks: Clicks,
    pub output: OutputOptions,
    /// The label name the client asked for, echoed in MONAI Label's `label_names`.
    pub label: Option<String>,
}

fn bad(message: impl Into<String>) -> ApiError {
    ApiError::BadRequest(message.into())
}

/// One `[i, j, k]` point: three finite numbers (integers, or floats for i/j as OHIF sends).
fn point(value: &Value, what: &str) -> Result<[f64; 3], ApiError> {
    let coords = value.as_array().ok_or_else(|| {
        bad(format!(
            "{what}: a point must be a list [i, j, k], got {value}"
        ))
    })?;
    if coords.len() != 3 {
        return Err(bad(format!(
            "{what}: a point must have 3 coordinates [i, j, k], got {value}"
        )));
    }
    let mut out = [0.0; 3];
    for (slot, coord) in out.iter_mut().zip(coords) {
        *slot = coord
            .as_f64()
            .filter(|v| v.is_finite())
            .ok_or_else(|| bad(format!("{what}: coordinates must be numbers, got {value}")))?;
    }
    Ok(out)
}

fn point_list(value: Option<&Value>, what: &str) -> Result<Vec<[f64; 3]>, ApiError> {
    match value {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(points)) => points.iter().map(|p| point(p, what)).collect(),
        // Clients before 2021 sent point lists as JSON strings.
        Some(Value::String(text)) => {
            let parsed: Value = serde_json::from_str(text)
                .map_err(|e| bad(format!("{what}: not a list of points: {e}")))?;
            point_list(Some(&parsed), what)
        }
        Some(other) => Err(bad(format!(
            "{what} must be a list of [i, j, k] points, got {other}"
        ))),
    }
}

/// `current_point` as `[[i, j, k]]` (Slicer, OHIF), `[i, j, k]` (Python harness) or absent (C++).
fn current_point(value: Option<&Value>) -> Result<Option<[f64; 3]>, ApiError> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Array(items)) if items.is_empty() => Ok(None),
        Some(Value::Array(items)) if items[0].is_array() => {
            if items.len() != 1 {
                return Err(bad("current_point must hold one point"));
            }
            point(&items[0], "current_point").map(Some)
        }
        Some(value) => point(value, "current_point").map(Some),
    }
}

fn integer(value: &Value, what: &str) -> Result<i64, ApiError> {
    let number = match value {
        Value::String(s) => s.trim().parse::<f64>().ok(),
        other => other.as_f64(),
    };
    match number {
        Some(v) if v.is_finite() && v.fract() == 0.0 && v.abs() < 1e15 => Ok(v as i64),
        _ => Err(bad(format!("{what} must be an integer, got {value}"))),
    }
}

fn output_options(raw: &RawParams) -> Result<OutputOptions, ApiError> {
    let compress = match &raw.result_compress {
        None | Some(Value::Null) => None,
        Some(Value::Bool(b)) => Some(*b),
        Some(Value::String(s)) => Some(matches!(
            s.to_ascii_lowercase().as_str(),
            "true" | "1" | "yes"
        )),
        Some(other) => Some(other.as_f64().is_some_and(|v| v != 0.0)),
    };
    let format = match raw
        .result_extension
        .as_deref()
        .map(str::to_ascii_lowercase)
        .as_deref()
    {
        None | Some("") => None,
        Some(".nii.gz") | Some("nii.gz") => Some(MaskFormat::NiftiGz),
        Some(".nii") | Some("nii") => Some(if compress == Some(true) {
            MaskFormat::NiftiGz
        } else {
            MaskFormat::Nifti
        }),
        Some(".nrrd") | Some("nrrd") => Some(MaskFormat::Nrrd {
            compress: compress.unwrap_or(false),
        }),
        Some(other) => {
            return Err(bad(format!(
                "result_extension '{other}' is not supported (use .nii.gz, .nii or .nrrd)"
            )))
        }
    };
    let dtype = match raw
        .result_dtype
        .as_deref()
        .map(str::to_ascii_lowercase)
        .as_deref()
    {
        None | Some("") | Some("uint8") => MaskDtype::U8,
        Some("uint16") => MaskDtype::U16,
        Some(other) => {
            return Err(bad(format!(
                "result_dtype '{other}' is not supported (use uint8 or uint16)"
            )))
        }
    };
    Ok(OutputOptions { format, dtype })
}

impl DeepgrowParams {
    /// Parses the multipart `params` field (absent, empty and `null` mean `{}`).
    pub fn parse(text: Option<&str>) -> Result<Self, ApiError> {
        let text = text
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .unwrap_or("{}");
        let value: Value = serde_json::from_str(text)
            .map_err(|e| bad(format!("params is not valid JSON: {e}")))?;
        let raw: RawParams = match value {
            Value::Null => RawParams::default(),
            Value::Object(_) => {
                serde_json::from_value(value).map_err(|e| bad(format!("params: {e}")))?
            }
            other => return Err(bad(format!("params must be a JSON object, got {other}"))),
        };
        let foreground = point_list(raw.foreground.as_ref(), "foreground")?;
        let background = point_list(raw.background.as_ref(), "background")?;
        let slice = match raw.slice.as_ref().filter(|v| !v.is_null()) {
            Some(value) => Some(integer(value, "slice")?),
            None => current_point(raw.current_point.as_ref())?.map(|p| p[2].trunc() as i64),
        };
        Ok(DeepgrowParams {
            clicks: Clicks {
                foreground,
                background,
                slice,
            },
            output: output_options(&raw)?,
            label: match raw.label {
                Some(Value::String(name)) if !name.is_empty() => Some(name),
                _ => None,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_every_client_shape() {
        let slicer = DeepgrowParams::parse(Some(
            r#"{"foreground":[[10,20,5]],"background":[],"current_point":[[10,20,5]],"spatial_size":[128,128]}"#,
        ))
        .unwrap();
        assert_eq!(slicer.clicks.foreground, vec![[10.0, 20.0, 5.0]]);
        assert_eq!(slicer.clicks.slice, Some(5));
        let python = DeepgrowParams::parse(Some(
            r#"{"foreground":[[10,20,5]],"current_point":[10,20,5]}"#,
        ))
        .unwrap();
        assert_eq!(python.clicks.slice, Some(5));
        let cpp = DeepgrowParams::parse(Some(r#"{"foreground":[[1,2,3]],"background":[[4,5,3]]}"#))
            .unwrap();
        assert_eq!(cpp.clicks.slice, None);
        assert_eq!(cpp.clicks.background, vec![[4.0, 5.0, 3.0]]);
        let ohif = DeepgrowParams::parse(Some(
            r#"{"foreground":[[250.7,100.2,3]],"background":[],"current_point":[[250.7,100.2,3]],"result_extension":".nrrd","result_dtype":"uint16","result_compress":true}"#,
        ))
        .unwrap();
        assert_eq!(ohif.clicks.foreground, vec![[250.7, 100.2, 3.0]]);
        assert_eq!(
            ohif.output.format,
            Some(MaskFormat::Nrrd { compress: true })
        );
        assert_eq!(ohif.output.dtype, MaskDtype::U16);
        let explicit = DeepgrowParams::parse(Some(
            r#"{"foreground":[[1,2,3]],"current_point":[[1,2,3]],"slice":7}"#,
        ))
        .unwrap();
        assert_eq!(
            explicit.clicks.slice,
            Some(7),
            "an explicit slice wins over current_point"
        );
    }

    #[test]
    fn empty_params_mean_no_clicks() {
        for text in [None, Some(""), Some("null"), Some("{}")] {
            let params = DeepgrowParams::parse(text).unwrap();
            assert!(params.clicks.foreground.is_empty() && params.clicks.background.is_empty());
        }
    }

    #[test]
    fn rejects_malformed_points_with_a_reason() {
        for (text, needle) in [
            ("{", "not valid JSON"),
            ("[1,2]", "JSON object"),
            (r#"{"foreground":[[1,2]]}"#, "3 coordinates"),
            (r#"{"foreground":[["a",2,3]]}"#, "numbers"),
            (r#"{"foreground":5}"#, "list of [i, j, k]"),
            (r#"{"slice":2.5,"foreground":[[1,2,3]]}"#, "integer"),
            (r#"{"result_extension":".png"}"#, "not supported"),
        ] {
            let error = DeepgrowParams::parse(Some(text)).unwrap_err().to_string();
            assert!(error.contains(needle), "{text}: {error}");
        }
    }
}
