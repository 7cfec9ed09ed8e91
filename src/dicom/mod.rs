//! DICOM in: series of instances (uploaded, zipped, or fetched from a PACS) read into the same [`Volume`]
//! the NIfTI path yields, so that sessions, the pipeline and masks stay as they are.
//!
//! [`Volume`]: crate::nifti_io::Volume

pub mod dimse;
mod peer;
mod scan;
pub mod series;
pub mod web;

pub use dimse::{ae_title, DimseClient, DimseConfig, PacsNode, SeriesQuery};
pub use peer::PeerError;
pub use series::{open_series, DicomError, DicomFile, Series};
pub use web::{DicomWebClient, DicomWebConfig};
