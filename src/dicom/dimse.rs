//! A DIMSE client of a PACS: C-GET of one series (OHIF v2's default "Fetch Images From Dicom Server"), on one
//! association, so that no port of ours has to be reachable from the PACS (C-MOVE would need one).
//!
//! A browser names the PACS, so only the nodes the operator listed (`--pacs`) are contacted. The instances
//! arrive as C-STORE sub-operations in the transfer syntax the PACS stores them in: Debian's Orthanc cannot
//! transcode JPEG 2000, so every syntax the reader decodes is proposed in a presentation context of its own
//! (a PACS picks one syntax per context, and would otherwise pick an uncompressed one it cannot deliver).
//! Each instance becomes a DICOM file, read by the same reader as an upload.

use std::borrow::Cow;
use std::time::Duration;

use bytes::Bytes;
use dicom_core::{DataElement, PrimitiveValue, Tag, VR};
use dicom_dictionary_std::tags;
use dicom_encoding::TransferSyntaxIndex;
use dicom_object::{FileMetaTableBuilder, InMemDicomObject};
use dicom_transfer_syntax_registry::{entries, TransferSyntaxRegistry};
use dicom_ul::association::client::{AsyncClientAssociation, ClientAssociationOptions};
use dicom_ul::association::Error as AssociationError;
use dicom_ul::pdu::{PDataValue, PDataValueType, Pdu, PresentationContextResultReason};
use tokio::net::TcpStream;

use super::PeerError;

const STUDY_ROOT_GET: &str = "1.2.840.10008.5.1.4.1.2.2.3";
const PATIENT_ROOT_GET: &str = "1.2.840.10008.5.1.4.1.2.1.3";
const EXPLICIT_VR_LE: &str = "1.2.840.10008.1.2.1";
const IMPLICIT_VR_LE: &str = "1.2.840.10008.1.2";

/// The storage classes a series to segment may have: CT (single- and multi-frame) and MR.
const STORAGE_CLASSES: [&str; 5] = [
    "1.2.840.10008.5.1.4.1.1.2",   // CT Image Storage
    "1.2.840.10008.5.1.4.1.1.2.1", // Enhanced CT Image Storage
    "1.2.840.10008.5.1.4.1.1.2.2", // Legacy Converted Enhanced CT Image Storage
    "1.2.840.10008.5.1.4.1.1.4",   // MR Image Storage
    "1.2.840.10008.5.1.4.1.1.4.1", // Enhanced MR Image Storage
];

/// Encoded syntaxes a PACS may store CT in, each proposed alone; those the registry cannot decode are
/// left out at run time.
const ENCODED_SYNTAXES: [&str; 13] = [
    "1.2.840.10008.1.2.4.90",  // JPEG 2000 lossless
    "1.2.840.10008.1.2.4.91",  // JPEG 2000
    "1.2.840.10008.1.2.4.70",  // JPEG lossless SV1
    "1.2.840.10008.1.2.4.57",  // JPEG lossless
    "1.2.840.10008.1.2.4.50",  // JPEG baseline
    "1.2.840.10008.1.2.4.51",  // JPEG extended
    "1.2.840.10008.1.2.5",     // RLE lossless
    "1.2.840.10008.1.2.1.99",  // deflated explicit VR little endian
    "1.2.840.10008.1.2.2",     // explicit VR big endian
    "1.2.840.10008.1.2.4.80",  // JPEG-LS lossless
    "1.2.840.10008.1.2.4.81",  // JPEG-LS near-lossless
    "1.2.840.10008.1.2.4.201", // HTJ2K lossless
    "1.2.840.10008.1.2.4.203", // HTJ2K
];

/// The largest PDU we accept: what one read may buffer.
const MAX_PDU: u32 = 1 << 20;
/// The largest DIMSE command set we accept (they are a few hundred bytes).
const MAX_COMMAND: usize = 64 << 10;

const C_STORE_RQ: u16 = 0x0001;
const C_STORE_RSP: u16 = 0x8001;
const C_GET_RQ: u16 = 0x0010;
const C_GET_RSP: u16 = 0x8010;
const NO_DATA_SET: u16 = 0x0101;
const PENDING: u16 = 0xFF00;

/// A PACS the operator allows (`--pacs HOST:PORT`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PacsNode {
    pub host: String,
    pub port: u16,
}

impl std::str::FromStr for PacsNode {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let (host, port) = text
            .rsplit_once(':')
            .ok_or_else(|| format!("expected HOST:PORT, got '{text}'"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let port = port
            .parse::<u16>()
            .ok()
            .filter(|&p| p > 0)
            .ok_or_else(|| format!("'{port}' is not a port number (in '{text}')"))?;
        if host.is_empty() {
            return Err(format!("no host in '{text}'"));
        }
        Ok(PacsNode {
            host: host.to_ascii_lowercase(),
            port,
        })
    }
}

/// An AE title (ours from `--ae-title`, or a PACS's from a client): 1 to 16 printable ASCII characters, not
/// all spaces, no backslash; returned trimmed.
pub fn ae_title(text: &str) -> Result<String, String> {
    let title = text.trim();
    if title.is_empty()
        || title.len() > 16
        || !title
            .bytes()
            .all(|b| (0x20..0x7f).contains(&b) && b != b'\\')
    {
        return Err(format!(
            "an AE title is 1 to 16 printable ASCII characters without '\\', got '{text}'"
        ));
    }
    Ok(title.to_owned())
}

/// How to talk DIMSE, and to whom.
#[derive(Debug, Clone)]
pub struct DimseConfig {
    /// Our AE title (`--ae-title`).
    pub ae_title: String,
    /// The PACS nodes a client may name (`--pacs`); none allows none.
    pub allowed: Vec<PacsNode>,
    pub connect_timeout: Duration,
    /// The longest a whole retrieval may take.
    pub timeout: Duration,
    /// The most bytes a series may take in transit.
    pub max_bytes: u64,
    /// The most instances a series may have.
    pub max_instances: usize,
}

/// The series to fetch and the PACS to fetch it from, as OHIF names them.
#[derive(Debug, Clone)]
pub struct SeriesQuery {
    pub host: String,
    pub port: u16,
    /// The PACS's AE title (the called AE).
    pub called_ae: String,
    pub patient_id: Option<String>,
    pub study_uid: String,
    pub series_uid: String,
}

pub struct DimseClient {
    config: DimseConfig,
}

/// A C-STORE sub-operation whose data set is arriving.
struct IncomingInstance {
    context: u8,
    message_id: u16,
    sop_class: String,
    sop_instance: String,
    data: Vec<u8>,
}

impl DimseClient {
    pub fn new(config: DimseConfig) -> Self {
        DimseClient { config }
    }

    /// Whether `--pacs` lists this node.
    fn allows(&self, host: &str, port: u16) -> bool {
        let host = host.trim().to_ascii_lowercase();
        self.config
            .allowed
            .iter()
            .any(|node| node.host == host && node.port == port)
    }

    /// Fetches every instance of the series by C-GET, each as a DICOM file named by its SOP Instance UID.
    pub async fn retrieve_series(
        &self,
        query: &SeriesQuery,
    ) -> Result<Vec<(String, Bytes)>, PeerError> {
        let peer = format!(
            "the PACS {} at {}:{}",
            query.called_ae, query.host, query.port
        );
        if !self.allows(&query.host, query.port) {
            let reason = if self.config.allowed.is_empty() {
                "this server is allowed no PACS (start it with --pacs HOST:PORT)".to_owned()
            } else {
                let allowed: Vec<String> = self
                    .config
                    .allowed
                    .iter()
                    .map(|n| format!("{}:{}", n.host, n.port))
                    .collect();
                format!("--pacs allows only {}", allowed.join(", "))
            };
            return Err(PeerError::NotAllowed { peer, reason });
        }
        let mut retrieval = Retrieval {
            config: &self.config,
            query,
            peer: peer.clone(),
            files: Vec::new(),
            bytes: 0,
        };
        match tokio::time::timeout(self.config.timeout, retrieval.run()).await {
            Ok(result) => result,
            Err(_) => Err(PeerError::TimedOut {
                peer,
                seconds: self.config.timeout.as_secs_f64(),
            }),
        }
    }
}

/// One C-GET, from association to release.
struct Retrieval<'a> {
    config: &'a DimseConfig,
    query: &'a SeriesQuery,
    peer: String,
    files: Vec<(String, Bytes)>,
    bytes: u64,
}

impl Retrieval<'_> {
    async fn run(&mut self) -> Result<Vec<(String, Bytes)>, PeerError> {
        let mut association = self.associate().await?;
        let outcome = self.get(&mut association).await;
        match &outcome {
            Ok(()) => {
                if let Err(error) = association.release().await {
                    tracing::warn!(peer = %self.peer, %error, "PACS association release failed");
                }
            }
            Err(_) => {
                let _ = association.abort().await;
            }
        }
        outcome.map(|()| std::mem::take(&mut self.files))
    }

    async fn associate(&self) -> Result<AsyncClientAssociation<TcpStream>, PeerError> {
        let uncompressed = || vec![Cow::from(EXPLICIT_VR_LE), Cow::from(IMPLICIT_VR_LE)];
        let mut options = ClientAssociationOptions::new()
            .calling_ae_title(self.config.ae_title.clone())
            .called_ae_title(self.query.called_ae.clone())
            .max_pdu_length(MAX_PDU)
            .connection_timeout(self.config.connect_timeout)
            .read_timeout(self.config.timeout)
            .write_timeout(self.config.timeout)
            .with_presentation_context(Cow::from(STUDY_ROOT_GET), uncompressed())
            .with_presentation_context(Cow::from(PATIENT_ROOT_GET), uncompressed());
        let decodable: Vec<&str> = ENCODED_SYNTAXES
            .into_iter()
            .filter(|uid| {
                TransferSyntaxRegistry
                    .get(uid)
                    .is_some_and(|ts| ts.can_decode_all())
            })
            .collect();
        for class in STORAGE_CLASSES {
            options = options
                .with_role_selection(class, false, true)
                .with_presentation_context(Cow::from(class), uncompressed());
            for syntax in &decodable {
                options =
                    options.with_presentation_context(Cow::from(class), vec![Cow::from(*syntax)]);
            }
        }
        let mut association = options
            .establish_async((self.query.host.as_str(), self.query.port))
            .await
            .map_err(|e| self.association_error(e))?;
        // Our C-STORE responses are small writes the PACS waits for: not held back by Nagle's algorithm.
        if let Err(error) = association.inner_stream().set_nodelay(true) {
            tracing::warn!(peer = %self.peer, %error, "TCP_NODELAY not set on the PACS connection");
        }
        Ok(association)
    }

    fn association_error(&self, error: AssociationError) -> PeerError {
        let peer = self.peer.clone();
        match error {
            AssociationError::Timeout { .. } => PeerError::TimedOut {
                peer,
                seconds: self.config.timeout.as_secs_f64(),
            },
            AssociationError::Connect { .. } | AssociationError::ToAddress { .. } => {
                PeerError::Unreachable {
                    peer,
                    reason: error_chain(&error),
                }
            }
            AssociationError::Rejected { .. } => PeerError::Refused {
                peer,
                answer: format!("rejected the association: {}", error_chain(&error)),
            },
            AssociationError::NoAcceptedPresentationContexts { .. } => PeerError::Refused {
                peer,
                answer: "accepted none of the proposed presentation contexts".into(),
            },
            AssociationError::Aborted { .. } | AssociationError::ConnectionClosed { .. } => {
                PeerError::Refused {
                    peer,
                    answer: format!("closed the association: {}", error_chain(&error)),
                }
            }
            other => PeerError::Malformed {
                peer,
                what: "the association",
                reason: error_chain(&other),
            },
        }
    }

    fn malformed(&self, reason: String) -> PeerError {
        PeerError::Malformed {
            peer: self.peer.clone(),
            what: "C-GET",
            reason,
        }
    }

    fn refused(&self, answer: String) -> PeerError {
        PeerError::Refused {
            peer: self.peer.clone(),
            answer,
        }
    }

    /// Sends the C-GET and takes the C-STORE sub-operations until the final C-GET response.
    async fn get(
        &mut self,
        association: &mut AsyncClientAssociation<TcpStream>,
    ) -> Result<(), PeerError> {
        let accepted = |uid: &str| {
            association
                .presentation_contexts()
                .iter()
                .find(|pc| {
                    pc.abstract_syntax == uid
                        && pc.reason == PresentationContextResultReason::Acceptance
                })
                .map(|pc| (pc.id, pc.transfer_syntax.clone()))
        };
        let (model, (context, syntax)) =
            match (accepted(STUDY_ROOT_GET), accepted(PATIENT_ROOT_GET)) {
                (Some(found), _) => (STUDY_ROOT_GET, found),
                (None, Some(found)) if self.query.patient_id.is_some() => (PATIENT_ROOT_GET, found),
                _ => {
                    return Err(self.refused(
                        "does not accept C-GET (Study Root, or Patient Root with a patient id)"
                            .into(),
                    ))
                }
            };
        let command = command_set([
            string(tags::AFFECTED_SOP_CLASS_UID, VR::UI, model),
            number(tags::COMMAND_FIELD, C_GET_RQ),
            number(tags::MESSAGE_ID, 1),
            number(tags::PRIORITY, 0),
            number(tags::COMMAND_DATA_SET_TYPE, 0x0001),
        ]);
        let mut identifier = vec![
            string(tags::QUERY_RETRIEVE_LEVEL, VR::CS, "SERIES"),
            string(tags::STUDY_INSTANCE_UID, VR::UI, &self.query.study_uid),
            string(tags::SERIES_INSTANCE_UID, VR::UI, &self.query.series_uid),
        ];
        if let Some(patient) = &self.query.patient_id {
            identifier.push(string(tags::PATIENT_ID, VR::LO, patient));
        }
        let identifier = encode(&InMemDicomObject::from_element_iter(identifier), &syntax)
            .map_err(|e| self.malformed(format!("encoding the identifier: {e}")))?;
        self.send(association, context, PDataValueType::Command, command)
            .await?;
        self.send(association, context, PDataValueType::Data, identifier)
            .await?;

        let mut command = Vec::new();
        let mut incoming: Option<IncomingInstance> = None;
        loop {
            quick_ack(association.inner_stream());
            let pdu = association
                .receive()
                .await
                .map_err(|e| self.association_error(e))?;
            let values = match pdu {
                Pdu::PData { data } => data,
                Pdu::AbortRQ { source } => {
                    return Err(self.refused(format!("aborted the association ({source:?})")))
                }
                Pdu::ReleaseRQ => {
                    return Err(
                        self.refused("released the association before the C-GET ended".into())
                    )
                }
                other => {
                    return Err(self.malformed(format!("unexpected {}", other.short_description())))
                }
            };
            for value in values {
                match value.value_type {
                    PDataValueType::Command => {
                        if command.len() + value.data.len() > MAX_COMMAND {
                            return Err(self.malformed("a command set over 64 KiB".into()));
                        }
                        command.extend_from_slice(&value.data);
                        if !value.is_last {
                            continue;
                        }
                        let set = parse_command(&std::mem::take(&mut command))
                            .map_err(|e| self.malformed(e))?;
                        match field(&set, tags::COMMAND_FIELD) {
                            Some(C_STORE_RQ) => {
                                incoming =
                                    Some(self.store_request(&set, value.presentation_context_id)?);
                                if field(&set, tags::COMMAND_DATA_SET_TYPE) == Some(NO_DATA_SET) {
                                    return Err(self
                                        .malformed("a C-STORE request without a data set".into()));
                                }
                            }
                            Some(C_GET_RSP) => {
                                if self.finished(&set)? {
                                    return Ok(());
                                }
                            }
                            other => {
                                return Err(self.malformed(format!(
                                    "unexpected DIMSE command {:#06x}",
                                    other.unwrap_or(0)
                                )))
                            }
                        }
                    }
                    PDataValueType::Data => {
                        let Some(instance) = incoming.as_mut() else {
                            return Err(
                                self.malformed("a data set outside a C-STORE request".into())
                            );
                        };
                        self.bytes += value.data.len() as u64;
                        if self.bytes > self.config.max_bytes {
                            return Err(PeerError::TooLarge {
                                uid: self.query.series_uid.clone(),
                                limit: format!(
                                    "more than {} bytes (--max-upload-bytes)",
                                    self.config.max_bytes
                                ),
                            });
                        }
                        instance.data.extend_from_slice(&value.data);
                        if value.is_last {
                            let instance = incoming.take().expect("an instance is arriving");
                            self.stored(association, instance).await?;
                        }
                    }
                }
            }
        }
    }

    async fn send(
        &self,
        association: &mut AsyncClientAssociation<TcpStream>,
        context: u8,
        kind: PDataValueType,
        data: Vec<u8>,
    ) -> Result<(), PeerError> {
        let pdu = Pdu::PData {
            data: vec![PDataValue {
                presentation_context_id: context,
                value_type: kind,
                is_last: true,
                data,
            }],
        };
        association
            .send(&pdu)
            .await
            .map_err(|e| self.association_error(e))
    }

    fn store_request(
        &self,
        set: &InMemDicomObject,
        context: u8,
    ) -> Result<IncomingInstance, PeerError> {
        if self.files.len() >= self.config.max_instances {
            return Err(PeerError::TooLarge {
                uid: self.query.series_uid.clone(),
                limit: format!(
                    "more than {} instances (--pacs-max-instances)",
                    self.config.max_instances
                ),
            });
        }
        Ok(IncomingInstance {
            context,
            message_id: field(set, tags::MESSAGE_ID).unwrap_or(0),
            sop_class: uid(set, tags::AFFECTED_SOP_CLASS_UID),
            sop_instance: uid(set, tags::AFFECTED_SOP_INSTANCE_UID),
            data: Vec::new(),
        })
    }

    /// Keeps a received instance as a DICOM file and acknowledges it.
    async fn stored(
        &mut self,
        association: &mut AsyncClientAssociation<TcpStream>,
        instance: IncomingInstance,
    ) -> Result<(), PeerError> {
        let syntax = association
            .presentation_contexts()
            .iter()
            .find(|pc| pc.id == instance.context)
            .map(|pc| pc.transfer_syntax.clone())
            .ok_or_else(|| {
                self.malformed(format!(
                    "a C-STORE on presentation context {}, which was not accepted",
                    instance.context
                ))
            })?;
        let file = part10_file(&instance, &syntax).map_err(|e| self.malformed(e))?;
        self.files.push((instance.sop_instance.clone(), file));
        let response = command_set([
            string(tags::AFFECTED_SOP_CLASS_UID, VR::UI, &instance.sop_class),
            number(tags::COMMAND_FIELD, C_STORE_RSP),
            number(tags::MESSAGE_ID_BEING_RESPONDED_TO, instance.message_id),
            number(tags::COMMAND_DATA_SET_TYPE, NO_DATA_SET),
            number(tags::STATUS, 0x0000),
            string(
                tags::AFFECTED_SOP_INSTANCE_UID,
                VR::UI,
                &instance.sop_instance,
            ),
        ]);
        self.send(
            association,
            instance.context,
            PDataValueType::Command,
            response,
        )
        .await
    }

    /// Whether a C-GET response ends the retrieval; an error when it ends it without the whole series.
    fn finished(&self, set: &InMemDicomObject) -> Result<bool, PeerError> {
        let status = field(set, tags::STATUS).unwrap_or(0xC000);
        if status == PENDING {
            return Ok(false);
        }
        let failed = field(set, tags::NUMBER_OF_FAILED_SUBOPERATIONS).unwrap_or(0);
        let comment = set
            .get(tags::ERROR_COMMENT)
            .and_then(|e| e.to_str().ok())
            .map(|c| format!(": {}", c.trim()))
            .unwrap_or_default();
        let received = self.files.len();
        let counted = [
            tags::NUMBER_OF_FAILED_SUBOPERATIONS,
            tags::NUMBER_OF_COMPLETED_SUBOPERATIONS,
            tags::NUMBER_OF_WARNING_SUBOPERATIONS,
        ]
        .map(|tag| u32::from(field(set, tag).unwrap_or(0)))
        .iter()
        .sum::<u32>();
        let success = status == 0x0000 || status == 0xB000;
        // Nothing matched: some PACS answer success with no sub-operation, Orthanc "unable to process".
        if received == 0 && counted == 0 && (success || (0xC000..=0xCFFF).contains(&status)) {
            tracing::info!(peer = %self.peer, status = format!("{status:#06x}"), "C-GET matched nothing");
            return Err(PeerError::SeriesNotFound {
                peer: self.peer.clone(),
                uid: self.query.series_uid.clone(),
            });
        }
        if success && failed == 0 && received > 0 {
            return Ok(true);
        }
        Err(self.refused(format!(
            "answered the C-GET with status {status:#06x} ({}){comment}: {received} instances received, \
             {failed} failed",
            status_meaning(status)
        )))
    }
}

/// ACKs what arrives at once. A PACS (DCMTK's, in Orthanc) writes an instance's last, short segment only when
/// the ones before it are ACKed, and Linux delays an ACK up to 40 ms: one instance in two waited that long
/// (8.8 s of 10.7 s for 200 JPEG 2000 slices from Orthanc). Linux leaves quick-ACK mode on its own, so this
/// is set before every read.
fn quick_ack(stream: &TcpStream) {
    #[cfg(target_os = "linux")]
    {
        let _ = socket2::SockRef::from(stream).set_tcp_quickack(true);
    }
    #[cfg(not(target_os = "linux"))]
    let _ = stream;
}

fn status_meaning(status: u16) -> &'static str {
    match status {
        0x0000 => "success",
        0xB000 => "some sub-operations failed",
        0xFE00 => "cancelled",
        0xA701 | 0xA702 => "out of resources",
        0xA900 => "the identifier does not match the SOP class",
        0x0122 => "SOP class not supported",
        0xC000..=0xCFFF => "unable to process",
        _ => "failure",
    }
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text = format!("{text}: {cause}");
        source = cause.source();
    }
    text
}

/// A UI or text element, padded to even length as DICOM requires (UIDs with NUL, text with a space).
fn string(tag: Tag, vr: VR, value: &str) -> DataElement<InMemDicomObject> {
    let mut value = value.trim().to_owned();
    if value.len() % 2 == 1 {
        value.push(if vr == VR::UI { '\0' } else { ' ' });
    }
    DataElement::new(tag, vr, PrimitiveValue::from(value))
}

fn number(tag: Tag, value: u16) -> DataElement<InMemDicomObject> {
    DataElement::new(tag, VR::US, PrimitiveValue::from(value))
}

/// A command set in implicit VR little endian, its group length computed.
fn command_set<const N: usize>(elements: [DataElement<InMemDicomObject>; N]) -> Vec<u8> {
    let set = InMemDicomObject::command_from_element_iter(elements);
    encode(&set, IMPLICIT_VR_LE).expect("a command set of plain elements encodes")
}

fn encode(set: &InMemDicomObject, syntax: &str) -> Result<Vec<u8>, String> {
    let ts = TransferSyntaxRegistry
        .get(syntax)
        .ok_or_else(|| format!("unknown transfer syntax {syntax}"))?;
    let mut bytes = Vec::new();
    set.write_dataset_with_ts(&mut bytes, ts)
        .map_err(|e| e.to_string())?;
    Ok(bytes)
}

/// Reads a command set: flat implicit VR little endian, each element's length checked against the bytes
/// first (the parser allocates what a length claims before reading it).
fn parse_command(bytes: &[u8]) -> Result<InMemDicomObject, String> {
    let mut at = 0;
    while at < bytes.len() {
        let header = bytes
            .get(at..at + 8)
            .ok_or("a command set ends inside an element header")?;
        let length = u32::from_le_bytes([header[4], header[5], header[6], header[7]]) as usize;
        at = at
            .checked_add(8 + length)
            .filter(|&end| end <= bytes.len())
            .ok_or("a command element longer than its command set")?;
    }
    InMemDicomObject::read_dataset_with_ts(bytes, &entries::IMPLICIT_VR_LITTLE_ENDIAN.erased())
        .map_err(|e| format!("a command set that does not parse: {e}"))
}

fn field(set: &InMemDicomObject, tag: Tag) -> Option<u16> {
    set.get(tag).and_then(|e| e.to_int::<u16>().ok())
}

fn uid(set: &InMemDicomObject, tag: Tag) -> String {
    set.get(tag)
        .and_then(|e| e.to_str().ok())
        .map(|s| s.trim_end_matches(['\0', ' ']).to_owned())
        .unwrap_or_default()
}

/// A C-STORE data set as a Part 10 file: preamble, `DICM`, file meta (its syntax the context's), data set.
fn part10_file(instance: &IncomingInstance, syntax: &str) -> Result<Bytes, String> {
    let meta = FileMetaTableBuilder::new()
        .media_storage_sop_class_uid(instance.sop_class.as_str())
        .media_storage_sop_instance_uid(instance.sop_instance.as_str())
        .transfer_syntax(syntax)
        .build()
        .map_err(|e| format!("file meta of instance {}: {e}", instance.sop_instance))?;
    let mut file = Vec::with_capacity(instance.data.len() + 512);
    file.extend_from_slice(&[0; 128]);
    file.extend_from_slice(b"DICM");
    meta.write(&mut file)
        .map_err(|e| format!("file meta of instance {}: {e}", instance.sop_instance))?;
    file.extend_from_slice(&instance.data);
    Ok(Bytes::from(file))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pacs_nodes_parse_as_host_and_port() {
        let node: PacsNode = "PACS.example.org:4242".parse().unwrap();
        assert_eq!(
            node,
            PacsNode {
                host: "pacs.example.org".into(),
                port: 4242
            }
        );
        let v6: PacsNode = "[::1]:104".parse().unwrap();
        assert_eq!(v6.host, "::1");
        assert!("pacs".parse::<PacsNode>().is_err());
        assert!("pacs:0".parse::<PacsNode>().is_err());
        assert!("pacs:70000".parse::<PacsNode>().is_err());
        assert!(":104".parse::<PacsNode>().is_err());
    }

    #[test]
    fn a_command_set_round_trips_with_its_group_length() {
        let bytes = command_set([
            string(tags::AFFECTED_SOP_CLASS_UID, VR::UI, STUDY_ROOT_GET),
            number(tags::COMMAND_FIELD, C_GET_RQ),
            number(tags::MESSAGE_ID, 7),
        ]);
        // (0000,0000) UL comes first and counts the bytes after it
        assert_eq!(&bytes[..8], &[0, 0, 0, 0, 4, 0, 0, 0]);
        let length = u32::from_le_bytes(bytes[8..12].try_into().unwrap()) as usize;
        assert_eq!(length, bytes.len() - 12);
        let set = parse_command(&bytes).unwrap();
        assert_eq!(field(&set, tags::COMMAND_FIELD), Some(C_GET_RQ));
        assert_eq!(field(&set, tags::MESSAGE_ID), Some(7));
        assert_eq!(uid(&set, tags::AFFECTED_SOP_CLASS_UID), STUDY_ROOT_GET);
    }

    #[test]
    fn a_command_claiming_more_than_it_holds_is_refused_before_parsing() {
        let mut bytes = command_set([number(tags::COMMAND_FIELD, C_STORE_RQ)]);
        let last = bytes.len() - 6;
        bytes[last..last + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(parse_command(&bytes).unwrap_err().contains("longer than"));
        assert!(parse_command(&bytes[..5]).unwrap_err().contains("header"));
    }

    #[tokio::test]
    async fn a_pacs_not_listed_is_never_contacted() {
        let client = DimseClient::new(DimseConfig {
            ae_title: "DEEPGROW".into(),
            allowed: vec!["pacs:4242".parse().unwrap()],
            connect_timeout: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            max_bytes: 1 << 20,
            max_instances: 10,
        });
        let query = SeriesQuery {
            host: "169.254.169.254".into(),
            port: 80,
            called_ae: "ANY".into(),
            patient_id: None,
            study_uid: "1.2".into(),
            series_uid: "1.2.3".into(),
        };
        let error = client.retrieve_series(&query).await.unwrap_err();
        assert_eq!(error.status(), 403);
        assert!(
            error.to_string().contains("--pacs allows only pacs:4242"),
            "{error}"
        );
    }
}
