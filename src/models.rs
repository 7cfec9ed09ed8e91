//! The model registry: one folder per model under the models directory, each with `model.onnx` and either our
//! `config.json` or NVIDIA Clara's `config_aiaa.json` (whose transform arguments give the pipeline parameters).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::deepgrow::PipelineConfig;
use crate::engine::{Engine, EngineError};

/// What `GET /v1/models` reports for a model (AIAA's model-info object; `version` is a string for C++ clients).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelInfo {
    pub name: String,
    #[serde(default)]
    pub labels: Vec<String>,
    #[serde(default)]
    pub description: String,
    #[serde(default = "default_version", deserialize_with = "string_or_number")]
    pub version: String,
    #[serde(rename = "type")]
    pub model_type: String,
    /// "2D" for a Deepgrow 2D model (AIAA's `meta_data.deepgrow`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deepgrow: Option<String>,
}

fn default_version() -> String {
    "1".into()
}

fn string_or_number<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    match Value::deserialize(deserializer)? {
        Value::String(s) => Ok(s),
        Value::Number(n) => Ok(n.to_string()),
        other => Err(serde::de::Error::custom(format!(
            "version must be a string, got {other}"
        ))),
    }
}

/// Our `config.json`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    #[serde(flatten)]
    pub info: ModelInfo,
    #[serde(default)]
    pub network: NetworkConfig,
    pub pipeline: PipelineConfig,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkConfig {
    #[serde(default)]
    pub input_name: Option<String>,
    #[serde(default)]
    pub output_name: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("cannot read models directory {0}: {1}")]
    Dir(PathBuf, std::io::Error),
    #[error("model folder {0}: {1}")]
    Config(PathBuf, String),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("no model found under {0} (each model is a folder with model.onnx and config.json)")]
    Empty(PathBuf),
}

/// A served model: its public info, its pipeline parameters and its engine.
pub struct Model {
    pub info: ModelInfo,
    pub pipeline: PipelineConfig,
    pub engine: Arc<dyn Engine>,
}

impl Model {
    pub fn is_deepgrow_2d(&self) -> bool {
        self.info.model_type.eq_ignore_ascii_case("deepgrow")
            && !self
                .info
                .deepgrow
                .as_deref()
                .unwrap_or("2D")
                .to_ascii_lowercase()
                .contains("3d")
    }
}

pub struct Registry {
    models: Vec<Arc<Model>>,
}

impl Registry {
    pub fn new(models: Vec<Arc<Model>>) -> Self {
        Registry { models }
    }

    /// Loads every model folder under `dir`; `load_engine(onnx_path, input_size)` builds each engine.
    pub fn load<F>(dir: &Path, mut load_engine: F) -> Result<Self, RegistryError>
    where
        F: FnMut(&Path, [usize; 2]) -> Result<Arc<dyn Engine>, EngineError>,
    {
        let mut folders: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| RegistryError::Dir(dir.to_owned(), e))?
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .filter(|path| path.is_dir())
            .collect();
        folders.sort();
        let mut models = Vec::new();
        for folder in folders {
            let Some(config) = read_model_config(&folder)? else {
                continue;
            };
            let engine = load_engine(&folder.join("model.onnx"), config.pipeline.model_size)?;
            tracing::info!(model = %config.info.name, folder = %folder.display(), "model loaded");
            models.push(Arc::new(Model {
                info: config.info,
                pipeline: config.pipeline,
                engine,
            }));
        }
        if models.is_empty() {
            return Err(RegistryError::Empty(dir.to_owned()));
        }
        Ok(Registry { models })
    }

    pub fn models(&self) -> &[Arc<Model>] {
        &self.models
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Model>> {
        self.models.iter().find(|m| m.info.name == name)
    }
}

/// Reads a model folder's config: `config.json` first, else a Clara `config_aiaa.json`; `None` for folders
/// with neither (or without `model.onnx`), which are skipped.
pub fn read_model_config(folder: &Path) -> Result<Option<ModelConfig>, RegistryError> {
    let error = |reason: String| RegistryError::Config(folder.to_owned(), reason);
    if !folder.join("model.onnx").is_file() {
        return Ok(None);
    }
    let config = if let Ok(text) = std::fs::read_to_string(folder.join("config.json")) {
        serde_json::from_str::<ModelConfig>(&text)
            .map_err(|e| error(format!("config.json: {e}")))?
    } else if let Ok(text) = std::fs::read_to_string(folder.join("config_aiaa.json")) {
        let fallback_name = folder
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let json: Value =
            serde_json::from_str(&text).map_err(|e| error(format!("config_aiaa.json: {e}")))?;
        clara_config(&json, &fallback_name).map_err(|e| error(format!("config_aiaa.json: {e}")))?
    } else {
        return Ok(None);
    };
    config
        .pipeline
        .validate()
        .map_err(|e| error(format!("pipeline: {e}")))?;
    Ok(Some(config))
}

/// Reads NVIDIA Clara's deepgrow 2D `config_aiaa.json`: model info from its top level, pipeline parameters
/// from the arguments of its pre-transforms (names matched on their last dotted component).
pub fn clara_config(json: &Value, fallback_name: &str) -> Result<ModelConfig, String> {
    let transforms = json["pre_transforms"]
        .as_array()
        .ok_or("it has no pre_transforms list")?;
    let args_of = |name: &str| -> Option<&Value> {
        transforms
            .iter()
            .find(|t| t["name"].as_str().and_then(|n| n.rsplit('.').next()) == Some(name))
            .map(|t| &t["args"])
    };
    let size_2d = |value: &Value, what: &str| -> Result<[usize; 2], String> {
        let list: Vec<usize> = value
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_u64().map(|v| v as usize))
                    .collect()
            })
            .unwrap_or_default();
        match list.as_slice() {
            [h, w] | [h, w, _] => Ok([*h, *w]),
            _ => Err(format!("{what} must be a list of two sizes")),
        }
    };
    let number = |value: &Value, what: &str| -> Result<f64, String> {
        value
            .as_f64()
            .ok_or_else(|| format!("{what} must be a number"))
    };

    let crop = args_of("SpatialCropGuidanced").ok_or("no SpatialCropGuidanced transform")?;
    let crop_size = size_2d(&crop["spatial_size"], "SpatialCropGuidanced.spatial_size")?;
    let margin = crop
        .get("margin")
        .map(|m| number(m, "margin"))
        .transpose()?
        .unwrap_or(20.0) as usize;
    let resize = args_of("Resized").ok_or("no Resized transform")?;
    let model_size = size_2d(&resize["spatial_size"], "Resized.spatial_size")?;
    let normalize = args_of("NormalizeIntensityd").ok_or("no NormalizeIntensityd transform")?;
    let subtrahend = number(&normalize["subtrahend"], "NormalizeIntensityd.subtrahend")? as f32;
    let divisor = number(&normalize["divisor"], "NormalizeIntensityd.divisor")? as f32;
    let sigma = args_of("AddGuidanceSignald")
        .and_then(|a| a.get("sigma"))
        .map(|s| number(s, "AddGuidanceSignald.sigma"))
        .transpose()?
        .unwrap_or(2.0) as f32;
    let target_spacing = match args_of("Spacingd").map(|a| &a["pixdim"]) {
        Some(pixdim) => {
            let values: Vec<f64> = pixdim
                .as_array()
                .map(|a| a.iter().filter_map(Value::as_f64).collect())
                .unwrap_or_default();
            match values.as_slice() {
                [a, b, ..] => [*a, *b],
                _ => return Err("Spacingd.pixdim must list two spacings".into()),
            }
        }
        None => [1.0, 1.0],
    };

    let deepgrow = json["inference"]["meta_data"]["deepgrow"]
        .as_str()
        .map(str::to_owned);
    let info = ModelInfo {
        name: json["name"].as_str().unwrap_or(fallback_name).to_owned(),
        labels: json["labels"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default(),
        description: json["description"]
            .as_str()
            .unwrap_or("Deepgrow 2D model (Clara MMAR)")
            .to_owned(),
        version: match &json["version"] {
            Value::String(s) => s.clone(),
            Value::Number(n) => n.to_string(),
            _ => default_version(),
        },
        model_type: json["type"].as_str().unwrap_or("deepgrow").to_owned(),
        deepgrow: deepgrow.or_else(|| Some("2D".into())),
    };
    Ok(ModelConfig {
        info,
        network: NetworkConfig::default(),
        pipeline: PipelineConfig {
            model_size,
            crop_size,
            margin,
            subtrahend,
            divisor,
            sigma,
            target_spacing,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_nvidia_clara_config_aiaa() {
        let json: Value =
            serde_json::from_str(include_str!("../tests/fixtures/clara/config_aiaa.json")).unwrap();
        let config = clara_config(&json, "clara_pt_deepgrow_2d_annotation").unwrap();
        assert_eq!(config.info.model_type, "deepgrow");
        assert_eq!(config.info.deepgrow.as_deref(), Some("2D"));
        assert_eq!(config.pipeline.model_size, [256, 256]);
        assert_eq!(config.pipeline.crop_size, [256, 256]);
        assert_eq!(config.pipeline.subtrahend, 208.0);
        assert_eq!(config.pipeline.divisor, 388.0);
        assert_eq!(config.pipeline.margin, 20);
        assert_eq!(config.pipeline.sigma, 2.0);
        assert_eq!(config.pipeline.target_spacing, [1.0, 1.0]);
    }

    struct NoEngine;

    impl Engine for NoEngine {
        fn input_size(&self) -> [usize; 2] {
            [256, 256]
        }

        fn infer(&self, _: ndarray::Array4<f32>) -> Result<ndarray::Array2<f32>, EngineError> {
            Err(EngineError::Run("not a real engine".into()))
        }
    }

    #[test]
    fn registry_reads_our_config_and_a_clara_folder() {
        let root = tempfile::tempdir().unwrap();
        let ours = root.path().join("a_ours");
        let clara = root.path().join("b_clara");
        let empty = root.path().join("c_no_model");
        for dir in [&ours, &clara, &empty] {
            std::fs::create_dir(dir).unwrap();
        }
        std::fs::write(ours.join("model.onnx"), b"").unwrap();
        std::fs::copy(
            concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/models/deepgrow_2d/config.json"
            ),
            ours.join("config.json"),
        )
        .unwrap();
        std::fs::write(clara.join("model.onnx"), b"").unwrap();
        std::fs::write(
            clara.join("config_aiaa.json"),
            include_str!("../tests/fixtures/clara/config_aiaa.json"),
        )
        .unwrap();
        std::fs::write(empty.join("config.json"), b"{}").unwrap();

        // The bundled model's input size, read independently of the registry's own parsing.
        let bundled: serde_json::Value =
            serde_json::from_slice(&std::fs::read(ours.join("config.json")).unwrap()).unwrap();
        let bundled_size: Vec<usize> =
            serde_json::from_value(bundled["pipeline"]["model_size"].clone()).unwrap();
        let bundled_size: [usize; 2] = bundled_size.try_into().unwrap();

        let mut requested = Vec::new();
        let registry = Registry::load(root.path(), |path, size| {
            requested.push((path.to_owned(), size));
            Ok(Arc::new(NoEngine) as Arc<dyn Engine>)
        })
        .unwrap();
        let names: Vec<&str> = registry
            .models()
            .iter()
            .map(|m| m.info.name.as_str())
            .collect();
        assert_eq!(
            names,
            ["deepgrow_2d", "b_clara"],
            "a folder without model.onnx is skipped"
        );
        assert_eq!(
            requested,
            [
                (ours.join("model.onnx"), bundled_size),
                (clara.join("model.onnx"), [256, 256])
            ]
        );
        let clara_model = registry.get("b_clara").unwrap();
        assert!(clara_model.is_deepgrow_2d());
        assert_eq!(clara_model.pipeline.divisor, 388.0);
    }

    #[test]
    fn a_broken_config_names_its_folder() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("broken");
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("model.onnx"), b"").unwrap();
        std::fs::write(
            dir.join("config.json"),
            br#"{"name": "x", "type": "deepgrow"}"#,
        )
        .unwrap();
        let error = Registry::load(
            root.path(),
            |_, _| Ok(Arc::new(NoEngine) as Arc<dyn Engine>),
        )
        .err()
        .expect("a config without pipeline must fail")
        .to_string();
        assert!(
            error.contains("broken") && error.contains("pipeline"),
            "{error}"
        );
    }

    #[test]
    fn version_numbers_become_strings() {
        let info: ModelInfo =
            serde_json::from_str(r#"{"name":"m","type":"deepgrow","version":2}"#).unwrap();
        assert_eq!(info.version, "2");
    }
}
