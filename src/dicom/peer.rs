//! What went wrong fetching a series from a PACS, over DICOMweb or DIMSE: each error names the peer
//! ("the DICOMweb server at …", "the PACS ORTHANC at host:port") and what it answered.

/// A failed retrieval from a PACS.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("series {uid} is not on {peer}")]
    SeriesNotFound { peer: String, uid: String },
    #[error("{peer} could not be reached: {reason}")]
    Unreachable { peer: String, reason: String },
    #[error("{peer} did not answer within {seconds} s")]
    TimedOut { peer: String, seconds: f64 },
    /// The peer answered, and its answer was no: `answer` says how, in the peer's words.
    #[error("{peer} {answer}")]
    Refused { peer: String, answer: String },
    #[error("the reply of {peer} to {what} is malformed: {reason}")]
    Malformed {
        peer: String,
        what: &'static str,
        reason: String,
    },
    #[error("series {uid} is larger than this server accepts: {limit}")]
    TooLarge { uid: String, limit: String },
    /// A client named a peer the operator did not allow (`--pacs`).
    #[error("{peer} is not a PACS this server may contact: {reason}")]
    NotAllowed { peer: String, reason: String },
}

impl PeerError {
    /// 504 for a timeout, 404 for a series the PACS does not have, 403 for a PACS not allowed, 413 for a
    /// series too large, 502 for the rest.
    pub fn status(&self) -> u16 {
        match self {
            PeerError::SeriesNotFound { .. } => 404,
            PeerError::NotAllowed { .. } => 403,
            PeerError::TimedOut { .. } => 504,
            PeerError::TooLarge { .. } => 413,
            _ => 502,
        }
    }
}
