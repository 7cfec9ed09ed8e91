//! A DICOMweb client of the PACS the viewer displays (`--dicomweb-url`): QIDO-RS finds a series' study,
//! WADO-RS retrieves its instances as `multipart/related; type="application/dicom"`, in the transfer syntax
//! they are stored in (`transfer-syntax=*`: PACS such as Debian's Orthanc cannot transcode JPEG 2000).
//!
//! Every failure says which peer failed and how: unreachable or refusing (502), too slow (504), or no such
//! series (404, the client's).

use std::time::Duration;

use bytes::Bytes;
use multer::{Constraints, Multipart, SizeLimit};
use serde_json::Value;

use super::PeerError;

/// How to reach the DICOMweb server.
#[derive(Debug, Clone)]
pub struct DicomWebConfig {
    /// The DICOMweb root, e.g. `http://pacs:8042/dicom-web` (QIDO-RS and WADO-RS under it).
    pub url: String,
    /// An `Authorization` header value (`Bearer …`, `Basic …`), when the server wants one.
    pub authorization: Option<String>,
    pub connect_timeout: Duration,
    /// The longest a whole retrieval may take.
    pub timeout: Duration,
    /// The most bytes a series may take in transit.
    pub max_bytes: u64,
    /// The most instances a series may have.
    pub max_instances: usize,
}

pub struct DicomWebClient {
    config: DicomWebConfig,
    http: reqwest::Client,
}

impl DicomWebClient {
    pub fn new(config: DicomWebConfig) -> Result<Self, String> {
        let http = reqwest::Client::builder()
            .connect_timeout(config.connect_timeout)
            .timeout(config.timeout)
            .build()
            .map_err(|e| format!("building the DICOMweb client: {e}"))?;
        Ok(DicomWebClient { config, http })
    }

    /// How errors name this peer.
    fn peer(&self) -> String {
        format!("the DICOMweb server at {}", self.config.url)
    }

    fn url(&self, path: &str) -> String {
        format!("{}/{path}", self.config.url.trim_end_matches('/'))
    }

    fn peer_error(&self, error: reqwest::Error) -> PeerError {
        if error.is_timeout() {
            PeerError::TimedOut {
                peer: self.peer(),
                seconds: self.config.timeout.as_secs_f64(),
            }
        } else {
            let mut reason = error.to_string();
            let mut source = std::error::Error::source(&error);
            while let Some(cause) = source {
                reason = format!("{reason}: {cause}");
                source = cause.source();
            }
            PeerError::Unreachable {
                peer: self.peer(),
                reason,
            }
        }
    }

    async fn get(
        &self,
        url: String,
        accept: &str,
        what: &'static str,
        series: &str,
    ) -> Result<reqwest::Response, PeerError> {
        let mut request = self.http.get(url).header(reqwest::header::ACCEPT, accept);
        if let Some(authorization) = &self.config.authorization {
            request = request.header(reqwest::header::AUTHORIZATION, authorization);
        }
        let response = request.send().await.map_err(|e| self.peer_error(e))?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let body = response.text().await.unwrap_or_default();
        if status == reqwest::StatusCode::NOT_FOUND && what == "WADO-RS" {
            // QIDO found it, so a 404 here means it went away in between
            return Err(self.not_found(series));
        }
        let body: String = body.chars().take(300).collect();
        Err(PeerError::Refused {
            peer: self.peer(),
            answer: format!("answered {} to {what}: {body}", status.as_u16()),
        })
    }

    fn not_found(&self, series: &str) -> PeerError {
        PeerError::SeriesNotFound {
            peer: self.peer(),
            uid: series.to_owned(),
        }
    }

    fn malformed(&self, what: &'static str, reason: String) -> PeerError {
        PeerError::Malformed {
            peer: self.peer(),
            what,
            reason,
        }
    }

    /// QIDO-RS: the study of a series.
    async fn study_of(&self, series: &str) -> Result<String, PeerError> {
        let url = self.url(&format!("series?SeriesInstanceUID={series}"));
        let response = self
            .get(url, "application/dicom+json", "QIDO-RS", series)
            .await?;
        let body = response.bytes().await.map_err(|e| self.peer_error(e))?;
        if body.iter().all(u8::is_ascii_whitespace) {
            // some servers answer 204 (empty) for no match
            return Err(self.not_found(series));
        }
        let found: Value =
            serde_json::from_slice(&body).map_err(|e| self.malformed("QIDO-RS", e.to_string()))?;
        let matches = found
            .as_array()
            .ok_or_else(|| self.malformed("QIDO-RS", "not a JSON array".into()))?;
        matches
            .iter()
            .find_map(|m| m["0020000D"]["Value"][0].as_str().map(str::to_owned))
            .ok_or_else(|| self.not_found(series))
    }

    /// The series' instances, as stored, each named by its position in the reply.
    pub async fn retrieve_series(&self, series: &str) -> Result<Vec<(String, Bytes)>, PeerError> {
        let study = self.study_of(series).await?;
        let url = self.url(&format!("studies/{study}/series/{series}"));
        let accept = "multipart/related; type=\"application/dicom\"; transfer-syntax=*";
        let response = self.get(url, accept, "WADO-RS", series).await?;
        let content_type = response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        // multipart/related, whose boundary multer's own helper (form-data only) will not take
        let boundary = content_type
            .parse::<mime::Mime>()
            .ok()
            .filter(|m| m.type_() == mime::MULTIPART)
            .and_then(|m| m.get_param(mime::BOUNDARY).map(|b| b.as_str().to_owned()))
            .ok_or_else(|| {
                self.malformed(
                    "WADO-RS",
                    format!("content type '{content_type}' is not multipart with a boundary"),
                )
            })?;
        let limit = self.config.max_bytes;
        let stream = response.bytes_stream();
        let constraints = Constraints::new().size_limit(SizeLimit::new().whole_stream(limit));
        let mut parts = Multipart::with_constraints(stream, boundary, constraints);
        let mut files = Vec::new();
        loop {
            let part = match parts.next_field().await {
                Ok(Some(part)) => part,
                Ok(None) => break,
                Err(error) => return Err(self.body_error(error, series)),
            };
            if files.len() >= self.config.max_instances {
                return Err(PeerError::TooLarge {
                    uid: series.to_owned(),
                    limit: format!(
                        "more than {} instances (--pacs-max-instances)",
                        self.config.max_instances
                    ),
                });
            }
            let bytes = part.bytes().await.map_err(|e| self.body_error(e, series))?;
            files.push((format!("{series}/{}", files.len()), bytes));
        }
        if files.is_empty() {
            return Err(self.not_found(series));
        }
        Ok(files)
    }

    fn body_error(&self, error: multer::Error, series: &str) -> PeerError {
        match error {
            multer::Error::StreamSizeExceeded { limit } => PeerError::TooLarge {
                uid: series.to_owned(),
                limit: format!("more than {limit} bytes (--max-upload-bytes)"),
            },
            multer::Error::StreamReadFailed(cause) => match cause.downcast::<reqwest::Error>() {
                Ok(error) => self.peer_error(*error),
                Err(other) => PeerError::Unreachable {
                    peer: self.peer(),
                    reason: other.to_string(),
                },
            },
            other => self.malformed("WADO-RS", other.to_string()),
        }
    }
}
