//! An uploaded image, whatever its format: a NIfTI file (streamed or buffered), or a DICOM series (its
//! instances as separate parts, or one zip). Each yields its geometry, slice k alone (what a click needs) or
//! the whole volume (what a session keeps), so the click path does not care which it got.

use std::io::Read;

use bytes::Bytes;
use ndarray::Array2;

use crate::dicom::{self, DicomError, DicomFile, Series};
use crate::error::ApiError;
use crate::nifti_io::{self, DecodeLimits, FileBytes, Geometry, NiftiFile, Volume};

/// What an upload's first bytes say it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Nifti,
    Dicom,
    Zip,
}

/// Bytes [`sniff`] needs to tell the formats apart.
pub const SNIFF_BYTES: usize = 132;

/// The format of a file from its first [`SNIFF_BYTES`] (fewer if the file is shorter); NIfTI is the default,
/// whose reader then says what is wrong with anything else.
pub fn sniff(prefix: &[u8]) -> Format {
    if prefix.starts_with(b"PK\x03\x04") {
        Format::Zip
    } else if prefix.get(128..132) == Some(b"DICM") || prefix.starts_with(b"DICM") {
        Format::Dicom
    } else {
        Format::Nifti
    }
}

/// An upload as the decoder gets it.
pub enum Upload<'a> {
    Nifti(FileBytes<'a>),
    /// Named files, each a DICOM instance or a zip of them.
    Dicom(Vec<(String, Bytes)>),
}

/// An upload whose header (or headers) have been read.
pub enum OpenImage<'a> {
    Nifti(NiftiFile<'a>),
    Dicom(Series),
}

/// Reads the upload's header(s): a NIfTI header, or every DICOM instance's, checked to form one volume.
pub fn open(upload: Upload<'_>, limits: DecodeLimits) -> Result<OpenImage<'_>, ApiError> {
    match upload {
        Upload::Nifti(bytes) => Ok(OpenImage::Nifti(nifti_io::open(bytes, limits)?)),
        Upload::Dicom(files) => {
            let unzipped = unzip_all(&files, limits)?;
            let instances: Vec<DicomFile<'_>> = unzipped
                .iter()
                .map(|(name, bytes)| DicomFile { name, bytes })
                .collect();
            Ok(OpenImage::Dicom(dicom::open_series(&instances, limits)?))
        }
    }
}

impl OpenImage<'_> {
    pub fn geometry(&self) -> &Geometry {
        match self {
            OpenImage::Nifti(file) => file.geometry(),
            OpenImage::Dicom(series) => series.geometry(),
        }
    }

    /// Whether the file was gzip-compressed (a mask mirrors it by default).
    pub fn was_compressed(&self) -> bool {
        match self {
            OpenImage::Nifti(file) => file.was_compressed(),
            OpenImage::Dicom(_) => false,
        }
    }

    /// Bytes the decoded volume will take.
    pub fn volume_bytes(&self) -> u64 {
        match self {
            OpenImage::Nifti(file) => file.volume_bytes(),
            OpenImage::Dicom(series) => series.volume_bytes(),
        }
    }

    /// Slice `k` as an (H, W) array indexed `[i, j]`, read (or decoded) no further than needed.
    pub fn read_slice(self, k: usize) -> Result<Array2<f32>, ApiError> {
        Ok(match self {
            OpenImage::Nifti(file) => file.read_slice(k)?,
            OpenImage::Dicom(series) => series.read_slice(k)?,
        })
    }

    pub fn read_volume(self) -> Result<Volume, ApiError> {
        Ok(match self {
            OpenImage::Nifti(file) => file.read_volume()?,
            OpenImage::Dicom(series) => series.read_volume()?,
        })
    }
}

/// The files, with every zip among them replaced by its entries (directories, DICOMDIR and macOS metadata
/// left out); the entries' total size is bounded by the decode limit, whatever the archive claims.
fn unzip_all(
    files: &[(String, Bytes)],
    limits: DecodeLimits,
) -> Result<Vec<(String, Bytes)>, DicomError> {
    let mut out = Vec::new();
    let mut budget = limits.max_decompressed_bytes;
    for (name, bytes) in files {
        if sniff(bytes) != Format::Zip {
            out.push((name.clone(), bytes.clone()));
            continue;
        }
        let not_zip = |reason: String| DicomError::NotDicom {
            name: name.clone(),
            reason: format!("a broken zip archive: {reason}"),
        };
        let mut archive = zip::ZipArchive::new(std::io::Cursor::new(bytes))
            .map_err(|e| not_zip(e.to_string()))?;
        for index in 0..archive.len() {
            let mut entry = archive
                .by_index(index)
                .map_err(|e| not_zip(e.to_string()))?;
            let entry_name = entry
                .name()
                .map_err(|e| not_zip(e.to_string()))?
                .into_owned();
            let base = entry_name.rsplit('/').next().unwrap_or_default();
            if entry.is_dir()
                || base.is_empty()
                || base.starts_with('.')
                || entry_name.starts_with("__MACOSX/")
                || base.eq_ignore_ascii_case("DICOMDIR")
            {
                continue;
            }
            let mut data = Vec::new();
            (&mut entry)
                .take(budget + 1)
                .read_to_end(&mut data)
                .map_err(|e| not_zip(format!("{entry_name}: {e}")))?;
            if data.len() as u64 > budget {
                return Err(DicomError::TooLarge {
                    needed: limits.max_decompressed_bytes + 1,
                    limit: limits.max_decompressed_bytes,
                });
            }
            budget -= data.len() as u64;
            out.push((format!("{name}/{entry_name}"), Bytes::from(data)));
        }
    }
    Ok(out)
}
