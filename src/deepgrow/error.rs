use super::clicks::ClickKind;

/// Why a request cannot go through the Deepgrow pipeline.
///
/// Every variant except [`DeepgrowError::InvalidConfig`] and [`DeepgrowError::GuidanceOutOfRange`]
/// (both mean the server wired things wrongly) is the client's doing (a 4xx); see
/// [`DeepgrowError::is_client_error`].
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DeepgrowError {
    #[error("no clicks: give at least one foreground or background point")]
    NoClicks,

    #[error("{kind} click #{index} {point:?} has a coordinate that is not a finite number")]
    NonFiniteClick {
        kind: ClickKind,
        index: usize,
        point: [f64; 3],
    },

    #[error(
        "{kind} click #{index} {point:?} is outside the volume: voxel indices [i, j, k] must lie \
         in 0..{} x 0..{} x 0..{}",
        shape[0],
        shape[1],
        shape[2]
    )]
    ClickOutOfRange {
        kind: ClickKind,
        index: usize,
        point: [f64; 3],
        shape: [usize; 3],
    },

    #[error("slice {slice} is outside the volume, which has slices 0..{depth}")]
    SliceOutOfRange { slice: i64, depth: usize },

    #[error("no click lies on slice {slice}; put at least one click on the slice to segment")]
    NoClickOnSlice { slice: usize },

    #[error(
        "the image's in-plane axes are not orthogonal (sheared voxel-to-world affine); \
         Deepgrow 2D supports only orthogonal in-plane axes"
    )]
    ObliqueInPlane,

    #[error("invalid in-plane voxel spacing {spacing:?} mm: it must be finite and greater than 0")]
    InvalidSpacing { spacing: [f64; 2] },

    #[error("the image slice is empty (shape {shape:?})")]
    EmptyImage { shape: [usize; 2] },

    #[error(
        "resampling this slice to the target spacing would give {shape:?} pixels, more than the \
         limit of {limit}; check the voxel spacing in the image header"
    )]
    ImageTooLarge { shape: [usize; 2], limit: usize },

    #[error("guidance point {point:?} lies outside the slice of shape {shape:?}")]
    GuidanceOutOfRange { point: [i64; 2], shape: [usize; 2] },

    #[error("invalid Deepgrow pipeline configuration: {0}")]
    InvalidConfig(String),
}

impl DeepgrowError {
    /// True when the request is at fault (map to 4xx); false for server-side faults (5xx).
    pub fn is_client_error(&self) -> bool {
        !matches!(
            self,
            DeepgrowError::InvalidConfig(_) | DeepgrowError::GuidanceOutOfRange { .. }
        )
    }
}
