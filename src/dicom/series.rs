//! A DICOM series (or one Enhanced multi-frame instance) -> the same [`Volume`] the NIfTI reader yields.
//!
//! Geometry as ITK/GDCM (and OHIF's cornerstone) build it: i = column, j = row, k in order of position along
//! the slice normal (ImageOrientationPatient's row x column cosines), spacing from PixelSpacing and the
//! ImagePositionPatient step, the origin at the first slice; the affine is DICOM's LPS turned into the RAS
//! the NIfTI path uses. That is the order clients click in and get masks back in.
//!
//! The voxels are stored with the rows reversed, as dcm2niix and dicom2nifti write a series' NIfTI conversion
//! ([`Geometry::rows_reversed`]): the network then sees a DICOM series exactly as it sees its NIfTI
//! conversion (and as the CTs it was trained on were stored), so both give the same mask.
//!
//! Voxels are HU (RescaleSlope/Intercept per instance or per frame), stored as int16 when every rescale is
//! integral and the range fits, else float32.

use std::collections::BTreeSet;

use dicom_core::{Tag, VR};
use dicom_dictionary_std::tags;
use dicom_encoding::TransferSyntaxIndex;
use dicom_object::{InMemDicomObject, OpenFileOptions};
use dicom_pixeldata::PixelDecoder;
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;
use rayon::prelude::*;

use ndarray::Array2;

use crate::nifti_io::{DecodeLimits, Geometry, Volume, VoxelData};

/// Slice steps may differ from their mean by this fraction of it (or by [`STEP_TOLERANCE_MM`], if larger):
/// more is a missing slice or a non-uniform stack.
pub const STEP_TOLERANCE: f64 = 0.01;
pub const STEP_TOLERANCE_MM: f64 = 0.01;
/// Largest sine of the angle between the slice step and the slice normal (about 0.1 degree): more is a
/// gantry tilt or a sheared stack, which a voxel grid of this kind cannot hold.
pub const MAX_TILT_SINE: f64 = 2e-3;

#[derive(Debug, thiserror::Error)]
pub enum DicomError {
    #[error("'{name}' is not a DICOM file: {reason}")]
    NotDicom { name: String, reason: String },
    #[error("no DICOM files in the upload")]
    Empty,
    #[error("'{name}' has no pixel data")]
    NoPixelData { name: String },
    #[error("'{name}' uses transfer syntax {uid} ({label}), which this server cannot decode")]
    UnsupportedTransferSyntax {
        name: String,
        uid: String,
        label: String,
    },
    #[error("'{name}' is a colour image ({photometric}, {samples} samples per pixel); only greyscale CT is segmented")]
    Colour {
        name: String,
        photometric: String,
        samples: u16,
    },
    #[error("the upload holds {count} series ({uids}); send one series")]
    SeveralSeries { count: usize, uids: String },
    #[error("'{name}' lacks {attribute}, so its place in the volume is unknown")]
    MissingGeometry {
        name: String,
        attribute: &'static str,
    },
    #[error(
        "the instances differ in {what} ('{first}' and '{other}'); a series must share one grid"
    )]
    MixedGrid {
        what: &'static str,
        first: String,
        other: String,
    },
    #[error("'{first}' and '{second}' lie at the same position ({position:.3} mm along the slice normal)")]
    DuplicatePosition {
        first: String,
        second: String,
        position: f64,
    },
    #[error("the slice step is not uniform: {found:.3} mm between '{before}' and '{after}' where the mean step is {mean:.3} mm (a missing slice or a non-uniform stack; tolerance {tolerance:.3} mm)")]
    NonUniformSteps {
        before: String,
        after: String,
        found: f64,
        mean: f64,
        tolerance: f64,
    },
    #[error("the slices are not stacked along their normal ({degrees:.2} degrees off: a gantry tilt or a sheared stack), which this server cannot represent")]
    Tilted { degrees: f64 },
    #[error("'{name}': {reason}")]
    Unsupported { name: String, reason: String },
    #[error("'{name}': the pixel data could not be decoded: {reason}")]
    Decode { name: String, reason: String },
    #[error("the series would take {needed} bytes decoded, more than the limit of {limit} bytes")]
    TooLarge { needed: u64, limit: u64 },
}

/// One uploaded or fetched file.
pub struct DicomFile<'a> {
    pub name: &'a str,
    pub bytes: &'a [u8],
}

/// A frame's place: its position along the normal and where its pixels are.
struct Frame {
    instance: usize,
    frame: u32,
    position: [f64; 3],
    rescale: (f64, f64),
    /// The range of its stored values (BitsStored, PixelRepresentation).
    stored_range: (f64, f64),
}

struct Instance {
    name: String,
    object: dicom_object::DefaultDicomObject,
}

/// Numbers of a DS/IS/US attribute, also when an explicit-VR file carries it as `UN` (its text then).
fn numbers(object: &InMemDicomObject, tag: Tag) -> Option<Vec<f64>> {
    let element = object.get(tag)?;
    if element.vr() == VR::UN {
        let bytes = element.value().to_bytes().ok()?;
        let text = String::from_utf8_lossy(&bytes);
        return text
            .trim_matches(|c: char| c == '\0' || c.is_whitespace())
            .split('\\')
            .map(|x| x.trim().parse().ok())
            .collect();
    }
    element.to_multi_float64().ok()
}

fn text(object: &InMemDicomObject, tag: Tag) -> String {
    object
        .get(tag)
        .and_then(|e| e.to_str().ok())
        .map(|s| {
            s.trim_matches(|c: char| c == '\0' || c.is_whitespace())
                .to_owned()
        })
        .unwrap_or_default()
}

fn integer(object: &InMemDicomObject, tag: Tag) -> Option<u32> {
    numbers(object, tag)
        .and_then(|v| v.first().copied())
        .filter(|v| *v >= 0.0 && v.fract() == 0.0)
        .map(|v| v as u32)
}

/// The first item of sequence `tag`.
fn item(object: &InMemDicomObject, tag: Tag) -> Option<&InMemDicomObject> {
    object.get(tag)?.items()?.first()
}

/// An attribute of the per-frame functional group `group` of frame `frame`, else of the shared one.
fn functional(object: &InMemDicomObject, frame: usize, group: Tag) -> Option<&InMemDicomObject> {
    object
        .get(tags::PER_FRAME_FUNCTIONAL_GROUPS_SEQUENCE)
        .and_then(|e| e.items())
        .and_then(|items| items.get(frame))
        .and_then(|f| item(f, group))
        .or_else(|| {
            item(object, tags::SHARED_FUNCTIONAL_GROUPS_SEQUENCE).and_then(|s| item(s, group))
        })
}

fn vector<const N: usize>(values: Option<Vec<f64>>) -> Option<[f64; N]> {
    values
        .filter(|v| v.len() >= N && v.iter().take(N).all(|x| x.is_finite()))
        .map(|v| std::array::from_fn(|n| v[n]))
}

fn dot(a: [f64; 3], b: [f64; 3]) -> f64 {
    a[0] * b[0] + a[1] * b[1] + a[2] * b[2]
}

fn cross(a: [f64; 3], b: [f64; 3]) -> [f64; 3] {
    [
        a[1] * b[2] - a[2] * b[1],
        a[2] * b[0] - a[0] * b[2],
        a[0] * b[1] - a[1] * b[0],
    ]
}

/// What every frame of the series shares.
#[derive(Clone, Copy, PartialEq)]
struct Grid {
    rows: u32,
    columns: u32,
    orientation: [f64; 6],
    spacing: [f64; 2],
    bits_allocated: u16,
}

/// A series whose headers have been read and checked: its frames in position order, its geometry, and the
/// parsed instances whose pixel data stays encoded until a slice or the volume is asked for.
pub struct Series {
    instances: Vec<Instance>,
    frames: Vec<Frame>,
    geometry: Geometry,
    fits_i16: bool,
}

/// Parses every file and checks that they form one volume; decodes no pixels.
pub fn open_series(files: &[DicomFile<'_>], limits: DecodeLimits) -> Result<Series, DicomError> {
    if files.is_empty() {
        return Err(DicomError::Empty);
    }
    let instances: Vec<Instance> = files
        .par_iter()
        .map(|file| {
            // lengths checked first: the parser allocates what a header claims before reading it
            super::scan::check_lengths(file.bytes, limits.max_decompressed_bytes).map_err(
                |reason| DicomError::NotDicom {
                    name: file.name.to_owned(),
                    reason: format!("malformed: {reason}"),
                },
            )?;
            let object = OpenFileOptions::new()
                .from_reader(file.bytes)
                .map_err(|e| DicomError::NotDicom {
                    name: file.name.to_owned(),
                    reason: e.to_string(),
                })?;
            Ok(Instance {
                name: file.name.to_owned(),
                object,
            })
        })
        .collect::<Result<_, DicomError>>()?;

    let series: BTreeSet<String> = instances
        .iter()
        .map(|i| text(&i.object, tags::SERIES_INSTANCE_UID))
        .collect();
    if series.len() > 1 {
        return Err(DicomError::SeveralSeries {
            count: series.len(),
            uids: series.into_iter().collect::<Vec<_>>().join(", "),
        });
    }

    let mut grid: Option<(Grid, &str)> = None;
    let mut frames = Vec::new();
    for (index, instance) in instances.iter().enumerate() {
        let (instance_grid, instance_frames) = describe(index, instance)?;
        match grid {
            None => grid = Some((instance_grid, &instance.name)),
            Some((first, first_name)) => {
                let what =
                    if first.rows != instance_grid.rows || first.columns != instance_grid.columns {
                        Some("size")
                    } else if first
                        .orientation
                        .iter()
                        .zip(&instance_grid.orientation)
                        .any(|(a, b)| (a - b).abs() > 1e-4)
                    {
                        Some("orientation")
                    } else if first
                        .spacing
                        .iter()
                        .zip(&instance_grid.spacing)
                        .any(|(a, b)| (a - b).abs() > 1e-4 * a.abs().max(1.0))
                    {
                        Some("pixel spacing")
                    } else if first.bits_allocated != instance_grid.bits_allocated {
                        Some("bits allocated")
                    } else {
                        None
                    };
                if let Some(what) = what {
                    return Err(DicomError::MixedGrid {
                        what,
                        first: first_name.to_owned(),
                        other: instance.name.clone(),
                    });
                }
            }
        }
        frames.extend(instance_frames);
    }
    let (grid, _) = grid.ok_or(DicomError::Empty)?;
    let row_cosines = [
        grid.orientation[0],
        grid.orientation[1],
        grid.orientation[2],
    ];
    let column_cosines = [
        grid.orientation[3],
        grid.orientation[4],
        grid.orientation[5],
    ];
    let normal = cross(row_cosines, column_cosines);
    frames.sort_by(|a, b| dot(a.position, normal).total_cmp(&dot(b.position, normal)));
    let name_of = |frame: &Frame| -> String {
        let name = &instances[frame.instance].name;
        if instances[frame.instance]
            .object
            .get(tags::NUMBER_OF_FRAMES)
            .is_some()
            && frames_of(&instances[frame.instance]) > 1
        {
            format!("{name} frame {}", frame.frame + 1)
        } else {
            name.clone()
        }
    };
    let step = check_stack(&frames, normal, name_of)?;

    let (rows, columns, depth) = (grid.rows as usize, grid.columns as usize, frames.len());
    // int16 when every frame's HU are integers within its range, as CT's are; float32 otherwise
    let fits_i16 = frames.iter().all(|f| {
        let (slope, intercept) = f.rescale;
        let ends = [
            f.stored_range.0 * slope + intercept,
            f.stored_range.1 * slope + intercept,
        ];
        slope.fract() == 0.0
            && intercept.fract() == 0.0
            && ends
                .iter()
                .all(|v| (f64::from(i16::MIN)..=f64::from(i16::MAX)).contains(v))
    });
    let plane = rows * columns;
    let sample_bytes: u64 = if fits_i16 { 2 } else { 4 };
    let needed = plane as u64 * depth as u64 * sample_bytes;
    if needed > limits.max_decompressed_bytes {
        return Err(DicomError::TooLarge {
            needed,
            limit: limits.max_decompressed_bytes,
        });
    }
    let (datatype, bitpix) = if fits_i16 { (4, 16) } else { (16, 32) };

    // LPS (DICOM) -> RAS (NIfTI): x and y change sign.
    let first = frames[0].position;
    let lps_columns = [
        row_cosines.map(|c| c * grid.spacing[1]),
        column_cosines.map(|c| c * grid.spacing[0]),
        step,
    ];
    // stored with the rows reversed: j = 0 is the last row, and j steps back up the column
    let last_row = (rows - 1) as f64;
    let mut affine = [[0.0; 4]; 4];
    for axis in 0..3 {
        let sign = if axis < 2 { -1.0 } else { 1.0 };
        for (c, column) in lps_columns.iter().enumerate() {
            affine[axis][c] = sign * column[axis];
        }
        affine[axis][3] = sign * (first[axis] + last_row * lps_columns[1][axis]);
        affine[axis][1] = -affine[axis][1];
    }
    affine[3][3] = 1.0;
    let mut geometry = Geometry::from_affine([columns, rows, depth], affine, datatype, bitpix);
    geometry.rows_reversed = true;
    Ok(Series {
        geometry,
        instances,
        frames,
        fits_i16,
    })
}

impl Series {
    pub fn geometry(&self) -> &Geometry {
        &self.geometry
    }

    /// Bytes the decoded volume takes.
    pub fn volume_bytes(&self) -> u64 {
        let [h, w, d] = self.geometry.shape;
        (h * w * d) as u64 * if self.fits_i16 { 2 } else { 4 }
    }

    /// Every frame decoded straight into its plane, in parallel (a JPEG 2000 slice takes tens of ms).
    pub fn read_volume(self) -> Result<Volume, DicomError> {
        let [h, w, d] = self.geometry.shape;
        let plane = h * w;
        let data = if self.fits_i16 {
            let mut out = vec![0i16; plane * d];
            decode_into(&self.instances, &self.frames, &mut out, plane, |v| v as i16)?;
            VoxelData::I16(out)
        } else {
            let mut out = vec![0f32; plane * d];
            decode_into(&self.instances, &self.frames, &mut out, plane, |v| v as f32)?;
            VoxelData::F32(out)
        };
        Ok(Volume {
            geometry: self.geometry,
            data,
            scaling: None,
            was_compressed: false,
        })
    }

    /// Slice `k` alone, as an (H, W) = (columns, rows) array indexed `[i, j]` (as `Volume::slice_f32`).
    pub fn read_slice(&self, k: usize) -> Result<Array2<f32>, DicomError> {
        let [h, w, _] = self.geometry.shape;
        let frame = &self.frames[k];
        let mut plane = vec![0f32; h * w];
        decode_frame(&self.instances[frame.instance], frame, &mut plane, |v| {
            v as f32
        })?;
        // the plane is stored i fastest: [j, i] in row-major order, i.e. [i, j] transposed
        let rows = Array2::from_shape_vec((w, h), plane).map_err(|e| DicomError::Decode {
            name: self.instances[frame.instance].name.clone(),
            reason: e.to_string(),
        })?;
        Ok(rows.reversed_axes())
    }
}

fn frames_of(instance: &Instance) -> u32 {
    integer(&instance.object, tags::NUMBER_OF_FRAMES)
        .unwrap_or(1)
        .max(1)
}

/// The grid an instance shares with the series, and its frames' places.
fn describe(index: usize, instance: &Instance) -> Result<(Grid, Vec<Frame>), DicomError> {
    let object: &InMemDicomObject = &instance.object;
    let name = &instance.name;
    let missing = |attribute: &'static str| DicomError::MissingGeometry {
        name: name.clone(),
        attribute,
    };
    if object.get(tags::PIXEL_DATA).is_none() {
        return Err(DicomError::NoPixelData { name: name.clone() });
    }
    let uid = instance.object.meta().transfer_syntax().to_owned();
    match TransferSyntaxRegistry.get(&uid) {
        Some(ts) if ts.can_decode_all() => {}
        found => {
            return Err(DicomError::UnsupportedTransferSyntax {
                name: name.clone(),
                label: found
                    .map(|ts| ts.name().to_owned())
                    .unwrap_or_else(|| "unknown".into()),
                uid,
            })
        }
    }
    let samples = integer(object, tags::SAMPLES_PER_PIXEL).unwrap_or(1) as u16;
    let photometric = text(object, tags::PHOTOMETRIC_INTERPRETATION);
    if samples != 1 || !(photometric.is_empty() || photometric.starts_with("MONOCHROME")) {
        return Err(DicomError::Colour {
            name: name.clone(),
            photometric,
            samples,
        });
    }
    let rows = integer(object, tags::ROWS).ok_or_else(|| missing("Rows"))?;
    let columns = integer(object, tags::COLUMNS).ok_or_else(|| missing("Columns"))?;
    let bits_allocated =
        integer(object, tags::BITS_ALLOCATED).ok_or_else(|| missing("BitsAllocated"))? as u16;
    if ![8, 16, 32].contains(&bits_allocated) {
        return Err(DicomError::Unsupported {
            name: name.clone(),
            reason: format!("{bits_allocated} bits allocated per sample"),
        });
    }
    let bits_stored = integer(object, tags::BITS_STORED)
        .map(|b| b.clamp(1, u32::from(bits_allocated)))
        .unwrap_or(u32::from(bits_allocated));
    let stored_range = if integer(object, tags::PIXEL_REPRESENTATION) == Some(1) {
        (
            -(2f64.powi(bits_stored as i32 - 1)),
            2f64.powi(bits_stored as i32 - 1) - 1.0,
        )
    } else {
        (0.0, 2f64.powi(bits_stored as i32) - 1.0)
    };
    let frame_count = frames_of(instance);
    let enhanced = object
        .get(tags::PER_FRAME_FUNCTIONAL_GROUPS_SEQUENCE)
        .is_some();
    if frame_count > 1 && !enhanced {
        return Err(DicomError::Unsupported {
            name: name.clone(),
            reason: format!("{frame_count} frames without per-frame functional groups (a cine or a legacy multi-frame image, not a volume)"),
        });
    }
    let orientation = vector::<6>(numbers(object, tags::IMAGE_ORIENTATION_PATIENT))
        .or_else(|| {
            functional(object, 0, tags::PLANE_ORIENTATION_SEQUENCE)
                .and_then(|g| vector::<6>(numbers(g, tags::IMAGE_ORIENTATION_PATIENT)))
        })
        .ok_or_else(|| missing("ImageOrientationPatient"))?;
    let spacing = vector::<2>(numbers(object, tags::PIXEL_SPACING))
        .or_else(|| {
            functional(object, 0, tags::PIXEL_MEASURES_SEQUENCE)
                .and_then(|g| vector::<2>(numbers(g, tags::PIXEL_SPACING)))
        })
        .filter(|s| s.iter().all(|v| *v > 0.0))
        .ok_or_else(|| missing("PixelSpacing"))?;
    let root_rescale = (
        numbers(object, tags::RESCALE_SLOPE).and_then(|v| v.first().copied()),
        numbers(object, tags::RESCALE_INTERCEPT).and_then(|v| v.first().copied()),
    );
    let mut frames = Vec::with_capacity(frame_count as usize);
    for frame in 0..frame_count {
        let position = if enhanced {
            functional(object, frame as usize, tags::PLANE_POSITION_SEQUENCE)
                .and_then(|g| vector::<3>(numbers(g, tags::IMAGE_POSITION_PATIENT)))
        } else {
            vector::<3>(numbers(object, tags::IMAGE_POSITION_PATIENT))
        }
        .ok_or_else(|| missing("ImagePositionPatient"))?;
        let rescale = match root_rescale {
            (Some(slope), Some(intercept)) => (slope, intercept),
            _ => functional(
                object,
                frame as usize,
                tags::PIXEL_VALUE_TRANSFORMATION_SEQUENCE,
            )
            .map(|g| {
                (
                    numbers(g, tags::RESCALE_SLOPE)
                        .and_then(|v| v.first().copied())
                        .unwrap_or(1.0),
                    numbers(g, tags::RESCALE_INTERCEPT)
                        .and_then(|v| v.first().copied())
                        .unwrap_or(0.0),
                )
            })
            .unwrap_or((1.0, 0.0)),
        };
        if !(rescale.0.is_finite() && rescale.1.is_finite() && rescale.0 != 0.0) {
            return Err(DicomError::Unsupported {
                name: name.clone(),
                reason: format!("rescale slope {} and intercept {}", rescale.0, rescale.1),
            });
        }
        frames.push(Frame {
            instance: index,
            frame,
            position,
            rescale,
            stored_range,
        });
    }
    Ok((
        Grid {
            rows,
            columns,
            orientation,
            spacing,
            bits_allocated,
        },
        frames,
    ))
}

/// Checks that the sorted frames are one evenly stepped stack along the normal; returns the step vector.
fn check_stack(
    frames: &[Frame],
    normal: [f64; 3],
    name_of: impl Fn(&Frame) -> String,
) -> Result<[f64; 3], DicomError> {
    if frames.len() < 2 {
        // one slice: a unit step along the normal (no thickness is needed for a 2D click)
        return Ok(normal);
    }
    let along: Vec<f64> = frames.iter().map(|f| dot(f.position, normal)).collect();
    for (pair, names) in along.windows(2).zip(frames.windows(2)) {
        if (pair[1] - pair[0]).abs() < 1e-3 {
            return Err(DicomError::DuplicatePosition {
                first: name_of(&names[0]),
                second: name_of(&names[1]),
                position: pair[0],
            });
        }
    }
    let n = frames.len();
    let mean = (along[n - 1] - along[0]) / (n - 1) as f64;
    let tolerance = (STEP_TOLERANCE * mean).max(STEP_TOLERANCE_MM);
    for (pair, names) in along.windows(2).zip(frames.windows(2)) {
        let found = pair[1] - pair[0];
        if (found - mean).abs() > tolerance {
            return Err(DicomError::NonUniformSteps {
                before: name_of(&names[0]),
                after: name_of(&names[1]),
                found,
                mean,
                tolerance,
            });
        }
    }
    let (first, last) = (frames[0].position, frames[n - 1].position);
    let step: [f64; 3] = std::array::from_fn(|a| (last[a] - first[a]) / (n - 1) as f64);
    let length = dot(step, step).sqrt();
    let off_normal = cross(step, normal);
    let sine = dot(off_normal, off_normal).sqrt() / length;
    if sine > MAX_TILT_SINE {
        return Err(DicomError::Tilted {
            degrees: sine.asin().to_degrees(),
        });
    }
    Ok(step)
}

/// Decodes each frame into its plane of `out`: HU, column fastest, the last row first.
fn decode_into<T: Send>(
    instances: &[Instance],
    frames: &[Frame],
    out: &mut [T],
    plane: usize,
    convert: impl Fn(f64) -> T + Sync,
) -> Result<(), DicomError> {
    out.par_chunks_mut(plane)
        .zip(frames)
        .try_for_each(|(target, frame)| {
            decode_frame(&instances[frame.instance], frame, target, &convert)
        })
}

fn decode_frame<T>(
    instance: &Instance,
    frame: &Frame,
    target: &mut [T],
    convert: impl Fn(f64) -> T,
) -> Result<(), DicomError> {
    let fail = |reason: String| DicomError::Decode {
        name: instance.name.clone(),
        reason,
    };
    let multi_frame = frames_of(instance) > 1;
    let decoded = if multi_frame {
        instance.object.decode_pixel_data_frame(frame.frame)
    } else {
        instance.object.decode_pixel_data()
    }
    .map_err(|e| fail(e.to_string()))?;
    let bits_stored = u32::from(decoded.bits_stored().clamp(1, 32));
    let signed = matches!(
        decoded.pixel_representation(),
        dicom_pixeldata::PixelRepresentation::Signed
    );
    let data = if multi_frame {
        decoded.frame_data(0).map_err(|e| fail(e.to_string()))?
    } else {
        decoded.data()
    };
    let bytes = usize::from(decoded.bits_allocated()).div_ceil(8);
    let plane = target.len();
    if data.len() < plane * bytes {
        return Err(fail(format!(
            "{} bytes of pixels for a {plane}-pixel frame",
            data.len()
        )));
    }
    // the stored value: the low bits_stored bits, sign-extended when PixelRepresentation says so
    let shift = 32 - bits_stored;
    let (slope, intercept) = frame.rescale;
    let hu = |raw: u32| {
        let high = raw << shift;
        let stored = if signed {
            f64::from((high as i32) >> shift)
        } else {
            f64::from(high >> shift)
        };
        convert(stored * slope + intercept)
    };
    let data = &data[..plane * bytes];
    let columns = decoded.columns() as usize;
    if columns == 0 || !plane.is_multiple_of(columns) {
        return Err(fail(format!("{columns} columns in a {plane}-pixel frame")));
    }
    // row r of the image is row (rows - 1 - r) of the stored plane
    let row_bytes = columns * bytes;
    for (source, target) in data
        .chunks_exact(row_bytes)
        .zip(target.rchunks_exact_mut(columns))
    {
        match bytes {
            1 => target
                .iter_mut()
                .zip(source)
                .for_each(|(t, &b)| *t = hu(u32::from(b))),
            2 => target
                .iter_mut()
                .zip(source.chunks_exact(2))
                .for_each(|(t, c)| *t = hu(u32::from(u16::from_ne_bytes([c[0], c[1]])))),
            _ => target
                .iter_mut()
                .zip(source.chunks_exact(4))
                .for_each(|(t, c)| *t = hu(u32::from_ne_bytes([c[0], c[1], c[2], c[3]]))),
        }
    }
    Ok(())
}
